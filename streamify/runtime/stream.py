"""Feed a token stream chunk by chunk through a model with a cache; measure loss, latency and cache bytes."""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from streamify.errors import InputError, UsageError
from streamify.progress import SILENT, Progress
from streamify.runtime.cache import cache_bytes, new_cache


@dataclass
class ChunkStats:
    """What one chunk of the stream cost and scored."""

    start: int
    tokens: int
    nll_sum: float
    scored: int
    seconds: float
    cache_bytes: int


def fresh_cache(model, kv_bits: int | None = None):
    """streamify's bounded cache for a streaming model (INT4 keys/values with ``kv_bits`` 4), else a dynamic one."""
    if getattr(model, "streamify_controller", None) is not None:
        return new_cache(model, kv_bits)
    if kv_bits is not None:
        raise UsageError("--kv-bits 4 needs a streaming model", "convert it first: streamify convert streaming")
    return DynamicCache(config=model.config)


def chunked(ids: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """``ids`` (1-D) in pieces of ``chunk`` tokens."""
    yield from (ids[start : start + chunk] for start in range(0, ids.numel(), chunk))


def text_pieces(lines: Iterable[str], tokenizer, chunk: int) -> Iterator[torch.Tensor]:
    """Token pieces of ``chunk`` ids from text arriving line by line (an endless input is fine).

    Text is tokenized a paragraph at a time (cut at line ends), so memory
    stays bounded by one paragraph plus one chunk.
    """
    pending: list[int] = []
    for line in lines:
        pending.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
        while len(pending) >= chunk:
            yield torch.tensor(pending[:chunk])
            del pending[:chunk]
    if pending:
        yield torch.tensor(pending)


@torch.inference_mode()
def stream_chunks(model, pieces: Iterable[torch.Tensor], kv_bits: int | None = None) -> Iterator[ChunkStats]:
    """Run token ``pieces`` (1-D each) through ``model`` with one cache, yielding each piece's stats.

    The loss of a piece covers the tokens it predicts: its own tokens after
    the first, plus the next piece's first token (from its last logits).
    """
    device = next(model.parameters()).device
    cache = fresh_cache(model, kv_bits)
    carry = None
    start = 0
    for tokens in pieces:
        piece = tokens.to(device)[None]
        began = time.perf_counter()
        logits = model(piece, past_key_values=cache, use_cache=True).logits[0].float()
        seconds = time.perf_counter() - began
        predicted = torch.cat([carry, logits[:-1]]) if carry is not None else logits[:-1]
        targets = piece[0] if carry is not None else piece[0, 1:]
        nll = F.cross_entropy(predicted, targets, reduction="sum").item() if targets.numel() else 0.0
        carry = logits[-1:]
        yield ChunkStats(start, piece.shape[1], nll, targets.numel(), seconds, cache_bytes(cache))
        start += piece.shape[1]


def stream_report(
    model, ids: torch.Tensor, chunk: int, progress: Progress = SILENT, kv_bits: int | None = None
) -> dict:
    """Stream ``ids`` and summarise: perplexity, cache bytes, latency per token early vs late."""
    pieces = stream_chunks(model, chunked(ids, chunk), kv_bits)
    stats = list(progress.track(pieces, "stream", total=math.ceil(ids.numel() / chunk)))
    return summarize(stats) | {"chunk": chunk, "kv_bits": kv_bits}


def summarize(stats: list[ChunkStats]) -> dict:
    """Perplexity, cache bytes and per-token latency of the first and last 10% of the pieces."""
    tail = max(1, len(stats) // 10)
    nll = sum(s.nll_sum for s in stats) / max(1, sum(s.scored for s in stats))

    return {
        "tokens": sum(s.tokens for s in stats),
        "perplexity": round(math.exp(nll), 4),
        "nll": round(nll, 6),
        "cache_bytes_max": max(s.cache_bytes for s in stats),
        "cache_bytes_last": stats[-1].cache_bytes,
        "latency_ms_first_10pct": _ms_per_token(stats[:tail]),
        "latency_ms_last_10pct": _ms_per_token(stats[-tail:]),
    }


@contextlib.contextmanager
def open_text(path: str) -> Iterator[Iterable[str]]:
    """Lines of a text file, or of stdin for ``-``; a clear error for a missing or unreadable file."""
    if path == "-":
        yield sys.stdin
        return
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--input {path}: no such file", "give a text file, or - to read standard input")
    with file.open(encoding="utf-8", errors="replace") as handle:
        yield handle


def stream_text(
    model,
    tokenizer,
    lines: Iterable[str],
    chunk: int,
    report_every: int,
    progress: Progress,
    kv_bits: int | None = None,
) -> dict:
    """Stream text of any length in constant memory; log a line every ``report_every`` pieces; summarise.

    Latency is per token, over the first and the last ``report_every`` pieces.
    """
    nll, scored, tokens, cache_max, count = 0.0, 0, 0, 0, 0
    first: list[ChunkStats] = []
    recent: collections.deque[ChunkStats] = collections.deque(maxlen=report_every)
    for item in stream_chunks(model, text_pieces(lines, tokenizer, chunk), kv_bits):
        count += 1
        nll, scored, tokens = nll + item.nll_sum, scored + item.scored, tokens + item.tokens
        cache_max = max(cache_max, item.cache_bytes)
        recent.append(item)
        if len(first) < report_every:
            first.append(item)
        if count % report_every == 0:
            window_nll = sum(s.nll_sum for s in recent) / max(1, sum(s.scored for s in recent))
            progress.log(
                f"tokens {tokens:>9,}  loss {window_nll:6.3f}  {_ms_per_token(recent):7.2f} ms/token  "
                f"cache {item.cache_bytes / 2**20:8.2f} MiB"
            )
    if not count:
        raise InputError("the input stream holds no text", "give a text file with some content")
    return {
        "tokens": tokens,
        "chunks": count,
        "chunk": chunk,
        "perplexity": round(math.exp(nll / max(1, scored)), 4),
        "cache_bytes_max": cache_max,
        "latency_ms_first": _ms_per_token(first),
        "latency_ms_last": _ms_per_token(recent),
    }


def _ms_per_token(stats: Iterable[ChunkStats]) -> float:
    stats = list(stats)
    return round(1000 * sum(s.seconds for s in stats) / max(1, sum(s.tokens for s in stats)), 4)
