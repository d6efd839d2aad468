"""Streaming evaluations: quality and cost over a long stream, and cached-vs-masked equivalence."""

from __future__ import annotations

import torch

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.progress import SILENT, Progress
from streamify.runtime.cache import new_cache
from streamify.runtime.stream import stream_report


def stream_ids(tokenizer, data: str, tokens: int) -> torch.Tensor:
    """``tokens`` consecutive held-out token ids of ``data`` (1-D)."""
    return token_blocks(tokenizer, load_texts(data, "heldout"), tokens, tokens, where=f"--data {data}")[0]


def stream_eval(
    checkpoint: Checkpoint,
    data: str,
    tokens: int,
    chunk: int,
    progress: Progress = SILENT,
    kv_bits: int | None = None,
) -> dict:
    """The runtime over ``tokens`` held-out tokens: perplexity, cache bytes, latency early vs late.

    A model that does not stream runs with transformers' dynamic cache (the
    full-attention baseline).
    """
    ids = stream_ids(checkpoint.tokenizer, data, tokens)
    report = stream_report(checkpoint.model, ids, chunk, progress, kv_bits)
    report["streaming"] = getattr(checkpoint.model, "streamify_controller", None) is not None
    return report


@torch.inference_mode()
def check_equivalence(
    checkpoint: Checkpoint, data: str, tokens: int | None, chunks: list[int], progress: Progress = SILENT
) -> dict:
    """Max |logit difference| between the chunked cached runtime and one forward under the sink + window mask.

    The default length, three times sinks + window, makes the window roll at
    least twice, so eviction and position re-indexing are exercised. Besides
    ``max_abs_diff`` it reports the logits' scale (``max_abs_logit``) and their
    ratio (``max_rel_diff``): fp32 sums taken in another order (threads, CPU
    kernels) move the difference by about 1e-6 of the scale, a wrong position or
    mask by orders of magnitude more (benchmarks/equivalence_spread.py).
    """
    model = checkpoint.model
    ctl = getattr(model, "streamify_controller", None)
    if ctl is None:
        raise UsageError(
            f"{checkpoint.source.spec} is not a streaming model, so there is nothing to check",
            "convert it first: streamify convert streaming MODEL -o OUT",
        )
    tokens = tokens or 3 * (ctl.spec.sinks + ctl.spec.window)
    ids = stream_ids(checkpoint.tokenizer, data, tokens)
    device = next(model.parameters()).device
    progress.log(f"reference: one forward over {tokens} tokens under the sink + window mask")
    reference = model(ids[None].to(device)).logits[0].float()
    scale = reference.abs().max().item()
    per_chunk = {}
    for chunk in chunks:
        progress.log(f"runtime: chunks of {chunk}")
        cache = new_cache(model)
        logits = [
            model(ids[None, start : start + chunk].to(device), past_key_values=cache, use_cache=True).logits[0].float()
            for start in range(0, tokens, chunk)
        ]
        per_chunk[str(chunk)] = (torch.cat(logits) - reference).abs().max().item()
    worst = max(per_chunk.values())
    return {
        "tokens": tokens,
        "chunks": chunks,
        "max_abs_diff": worst,
        "max_abs_logit": scale,
        "max_rel_diff": worst / scale if scale else 0.0,
        "per_chunk": per_chunk,
    }
