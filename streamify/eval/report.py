"""The eval report: perplexity on held-out text plus size, parameters, load time and memory.

The report's keys are an interface (README.md, "Eval report"): ``perplexity``,
``nll``, ``tokens``, ``seq_len``, ``data``, ``params``, ``size_bytes``,
``bits_per_weight``, ``load_seconds``, ``peak_memory_bytes``; with ``stream_tokens``
also ``stream.perplexity``, ``stream.cache_bytes_max``, ``stream.latency_ms_first_10pct``,
``stream.latency_ms_last_10pct`` (and the rest of :func:`~streamify.eval.streaming.stream_eval`);
with ``equivalence`` also ``equivalence.max_abs_diff`` (:func:`~streamify.eval.streaming.check_equivalence`).
"""

from __future__ import annotations

import resource
import sys
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.eval.perplexity import perplexity
from streamify.io.checkpoint import Checkpoint
from streamify.model.params import count_params
from streamify.progress import SILENT, Progress


class EvalSpec(BaseModel):
    """What to evaluate on: held-out split of ``data``, windows of ``seq_len``, at most ``max_tokens``."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("builtin:pydoc", description="eval text (held-out split for builtin:pydoc)")
    max_tokens: int = Field(16384, gt=0, description="tokens to score, rounded down to whole windows")
    seq_len: int = Field(512, ge=2, description="window length; windows do not overlap")
    batch_size: int = Field(1, gt=0, description="windows per forward pass")
    stream_tokens: int = Field(
        0, ge=0, description="also stream this many held-out tokens through the runtime (0: off)"
    )
    stream_chunk: int = Field(16, gt=0, description="tokens fed per step when streaming")
    stream_kv_bits: Literal[4] | None = Field(None, description="4: stream with the recent keys/values in INT4")
    equivalence: bool = Field(
        False, description="streaming models: also check the chunked cached runtime against a masked forward"
    )


def eval_blocks(tokenizer, spec: EvalSpec) -> torch.Tensor:
    """The token windows an eval scores."""
    texts = load_texts(spec.data, "heldout")
    return token_blocks(tokenizer, texts, spec.seq_len, spec.max_tokens, where=f"--data {spec.data}")


def is_causal_lm(model) -> bool:
    """True when the model predicts next tokens (so perplexity applies)."""
    return type(model) in set(MODEL_FOR_CAUSAL_LM_MAPPING.values())


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the accelerator's allocator peak, or this process's max RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def evaluate(
    checkpoint: Checkpoint,
    spec: EvalSpec,
    *,
    size_bytes: int,
    load_seconds: float | None = None,
    blocks: torch.Tensor | None = None,
    progress: Progress = SILENT,
) -> dict:
    """Evaluate a checkpoint; ``blocks`` overrides the windows (to score two models on the same tokens)."""
    model = checkpoint.model
    params = count_params(model)
    report: dict = {"params": params, "size_bytes": size_bytes, "bits_per_weight": size_bytes * 8 / params}
    if not is_causal_lm(model):
        report.update(perplexity=None, note="not a causal LM: perplexity does not apply")
    elif checkpoint.tokenizer is None and blocks is None:
        report.update(perplexity=None, note="the checkpoint has no tokenizer: perplexity skipped")
    else:
        windows = blocks if blocks is not None else eval_blocks(checkpoint.tokenizer, spec)
        report.update(perplexity(model, windows, spec.batch_size, progress))
        report.update(seq_len=int(windows.shape[1]), data=spec.data)
        if spec.stream_tokens:
            from streamify.eval.streaming import stream_eval

            streamed = stream_eval(
                checkpoint, spec.data, spec.stream_tokens, spec.stream_chunk, progress, spec.stream_kv_bits
            )
            report.update({f"stream.{key}": value for key, value in streamed.items()})
        if spec.equivalence:
            from streamify.eval.streaming import check_equivalence

            checked = check_equivalence(checkpoint, spec.data, None, [1, 7, 64], progress)
            report.update({f"equivalence.{key}": value for key, value in checked.items()})
    report["load_seconds"] = load_seconds
    report["peak_memory_bytes"] = peak_memory_bytes(next(model.parameters()).device)
    return report
