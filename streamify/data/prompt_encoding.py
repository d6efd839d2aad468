"""Prompts as a video denoiser's conditions: the text encoder's states, as diffusers' ``WanPipeline`` makes them.

``streamify encode-prompts PROMPTS.txt -o conditions.safetensors --text-encoder
WAN_FOLDER`` reads one prompt a line and runs the ``tokenizer/`` and
``text_encoder/`` (UMT5) of a Wan Diffusers checkpoint through the pipeline's own
``encode_prompt``: padded to ``max_length`` tokens, the states past each
prompt's end zeroed. The file holds ``conditions`` ``[prompts, max_length,
dim]``, the ``--data`` of ``distill.ode_init`` and ``distill.self_forcing``, and
for a single prompt also ``condition`` ``[max_length, dim]``, what ``generate
--condition`` reads. ``unconditional`` ``[max_length, dim]`` holds the states of
``--negative`` (WanPipeline's ``negative_prompt``, ``""`` by default), which
guided passes take as their unconditional branch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamify.errors import InputError, UsageError
from streamify.io.safetensors_file import read_named_tensor, save_file_whole
from streamify.progress import SILENT, Progress

WAN_MAX_LENGTH = 512  # WanPipeline's max_sequence_length


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of ``path``; InputError naming the file when there are none or it is not text."""
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable text file ({error})", "write one prompt a line, UTF-8") from None
    if not prompts:
        raise InputError(f"{path}: no prompts in it", "write one prompt a line")
    return prompts


def load_text_encoder(folder: Path, device: torch.device):
    """A ``WanPipeline`` holding only the tokenizer and text encoder of the Wan Diffusers checkpoint ``folder``."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    hint = "give a Wan Diffusers checkpoint folder (with tokenizer/ and text_encoder/)"
    for part in ("tokenizer", "text_encoder"):
        if not (folder / part).is_dir():
            raise InputError(f"--text-encoder {folder}: no {part}/ folder there", hint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder").to(device).eval()
    except (OSError, ValueError) as error:
        raise InputError(f"{folder}: its tokenizer or text encoder does not load ({error})", hint) from None
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)


@torch.no_grad()
def encode_prompts(
    pipeline, prompts: list[str], max_length: int = WAN_MAX_LENGTH, batch: int = 8, progress: Progress = SILENT
) -> torch.Tensor:
    """``[prompts, max_length, dim]`` fp32 states of ``prompts``, ``batch`` at a time (module doc)."""
    device = next(pipeline.text_encoder.parameters()).device
    parts = []
    for start in progress.track(range(0, len(prompts), batch), "prompts", total=-(-len(prompts) // batch)):
        states, _ = pipeline.encode_prompt(
            prompts[start : start + batch],
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=device,
            dtype=torch.float32,
        )
        parts.append(states.cpu())
    return torch.cat(parts)


def require_new_file(output: Path) -> None:
    """UsageError when ``output`` exists (nothing is overwritten)."""
    if output.exists():
        raise UsageError(f"{output} exists", "give a new file to -o")


def write_conditions(conditions: torch.Tensor, unconditional: torch.Tensor, output: Path) -> list[str]:
    """Write ``conditions`` (and ``condition`` for one prompt) and the negative prompt's ``unconditional``
    states to the new file ``output`` whole; the tensor names written."""
    require_new_file(output)
    tensors = {"conditions": conditions.contiguous(), "unconditional": unconditional.contiguous()}
    if conditions.shape[0] == 1:
        tensors["condition"] = conditions[0].clone()  # its own storage: safetensors stores no shared tensors
    save_file_whole(tensors, output)
    return sorted(tensors)


def read_unconditional(path: Path, shape: torch.Size) -> torch.Tensor | None:
    """The ``unconditional`` states of a conditions file (a negative prompt's, :func:`write_conditions`), None
    when it has none; InputError when they are not ``shape`` (a condition's ``[tokens, text_dim]``)."""
    hint = "write the file with streamify encode-prompts (--negative), its states shaped like the conditions"
    negative = read_named_tensor(path, "unconditional", hint, optional=True)
    if negative is not None and negative.shape != shape:
        raise InputError(f"{path}: 'unconditional' is {list(negative.shape)}, the conditions {list(shape)}", hint)
    return negative
