"""streamify: turn offline model checkpoints into streaming, compressed, deployable ones."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    lazy: bool = False,
    verify: bool = False,
):
    """Load any model streamify accepts (an artifact folder, HF folder, .gguf, builtin alias, hub id).

    Returns ``(model, tokenizer)``; the model is in eval mode on ``device``
    (tokenizer is None when the checkpoint ships none). ``lazy`` runs the
    model block by block: each block's weights are read from the safetensors
    files (or decoded from a coded artifact) just before it runs, then dropped.
    ``verify`` first checks a streamify artifact's files against the sha256
    its manifest recorded (raises ``InputError`` naming a file that differs).
    """
    from streamify.io.load import load_checkpoint

    checkpoint = load_checkpoint(
        path,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        lazy=lazy,
        verify=verify,
    )
    return checkpoint.model, checkpoint.tokenizer
