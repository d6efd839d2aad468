"""Streaming evaluations: quality and cost over a long stream, and the runtime against an independent reference."""

from __future__ import annotations

import torch

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.errors import UsageError
from streamify.eval.reference import streamingllm_logits
from streamify.io.checkpoint import Checkpoint
from streamify.progress import SILENT, Progress
from streamify.runtime.attention import disable_streaming, enable_streaming
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
    """Max |logit difference| between the chunked cached runtime and an independent StreamingLLM reference.

    The reference (:func:`~streamify.eval.reference.streamingllm_logits`) is the
    stock transformers model decoding one token at a time over exactly the
    tokens StreamingLLM's cache holds, at the positions it gives them; none of
    the runtime's attention code runs in it. The default length, three times
    sinks + window, makes the window roll at least twice. Besides
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
    spec = ctl.spec
    tokens = tokens or 3 * (spec.sinks + spec.window)
    ids = stream_ids(checkpoint.tokenizer, data, tokens)
    device = next(model.parameters()).device
    progress.log(f"reference: stock {type(model).__name__}, token by token, StreamingLLM cache ({tokens} tokens)")
    disable_streaming(model)
    try:
        reference = streamingllm_logits(model, ids, spec, progress)
    finally:
        enable_streaming(model, spec)
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
        "reference": "stock transformers model, token by token, StreamingLLM cache",
        "tokens": tokens,
        "chunks": chunks,
        "max_abs_diff": worst,
        "max_abs_logit": scale,
        "max_rel_diff": worst / scale if scale else 0.0,
        "per_chunk": per_chunk,
    }
