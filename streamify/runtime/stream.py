"""Feed a token stream chunk by chunk through a model with a cache; measure loss, latency and cache bytes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from streamify.progress import SILENT, Progress
from streamify.runtime.cache import new_cache


@dataclass
class ChunkStats:
    """What one chunk of the stream cost and scored."""

    start: int
    tokens: int
    nll_sum: float
    scored: int
    seconds: float
    cache_bytes: int


def fresh_cache(model):
    """streamify's bounded cache for a streaming model, transformers' dynamic cache otherwise."""
    if getattr(model, "streamify_controller", None) is not None:
        return new_cache(model)
    return DynamicCache(config=model.config)


def cache_nbytes(cache) -> int:
    """Bytes of keys and values a cache holds now."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def stream_chunks(model, ids: torch.Tensor, chunk: int) -> Iterator[ChunkStats]:
    """Run ``ids`` (1-D) through ``model`` ``chunk`` tokens at a time, yielding each chunk's stats.

    The loss of a chunk covers the tokens it predicts: its own tokens after
    the first, plus the next chunk's first token (from its last logits).
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    cache = fresh_cache(model)
    carry = None
    for start in range(0, ids.numel(), chunk):
        piece = ids[start : start + chunk][None]
        began = time.perf_counter()
        logits = model(piece, past_key_values=cache, use_cache=True).logits[0].float()
        seconds = time.perf_counter() - began
        predicted = torch.cat([carry, logits[:-1]]) if carry is not None else logits[:-1]
        targets = piece[0] if carry is not None else piece[0, 1:]
        nll = F.cross_entropy(predicted, targets, reduction="sum").item() if targets.numel() else 0.0
        carry = logits[-1:]
        yield ChunkStats(start, piece.shape[1], nll, targets.numel(), seconds, cache_nbytes(cache))


def stream_report(model, ids: torch.Tensor, chunk: int, progress: Progress = SILENT) -> dict:
    """Stream ``ids`` and summarise: perplexity, cache bytes, latency per token early vs late."""
    stats = []
    for item in progress.track(stream_chunks(model, ids, chunk), "stream", total=math.ceil(ids.numel() / chunk)):
        stats.append(item)
    tail = max(1, len(stats) // 10)
    nll = sum(s.nll_sum for s in stats) / max(1, sum(s.scored for s in stats))

    def latency(part: list[ChunkStats]) -> float:
        return round(1000 * sum(s.seconds for s in part) / sum(s.tokens for s in part), 4)

    return {
        "tokens": int(ids.numel()),
        "chunk": chunk,
        "perplexity": round(math.exp(nll), 4),
        "nll": round(nll, 6),
        "cache_bytes_max": max(s.cache_bytes for s in stats),
        "cache_bytes_last": stats[-1].cache_bytes,
        "latency_ms_first_10pct": latency(stats[:tail]),
        "latency_ms_last_10pct": latency(stats[-tail:]),
    }
