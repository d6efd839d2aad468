"""Streaming attention on SmolLM2-135M over a long held-out stream, side by side in one run.

Usage:  .venv/bin/python benchmarks/streaming_llm.py [--tokens 8192] [--window 512] [--heal-steps 60]
                                                     [--heal-seq-len 1024] [--json out.json]
        .venv/bin/python benchmarks/streaming_llm.py --latency [--tokens 8192]
        (--only TEXT: only the variants whose name contains TEXT, beside full attention)

Variants: full attention (transformers' DynamicCache), window only (0 sinks), 4 sinks + window
(StreamingLLM), and the middle-third hybrid (LongGen: layers 10-19 full); the three streaming
variants also after LoRA healing against the full-attention model (builtin:pydoc train split, so
the held-out stream is never trained on). Every variant streams the same tokens in fp32, 16 tokens
per step except over tokens 500-700 and the last 200, which are fed one at a time: the per-token
decode latency there is reported ("at 600" and "at the end"), and their ratio (this
machine is noisy; ratios are what compare). Chunking does not change the logits (the runtime's
equivalence check). ``--latency`` measures decode latency more robustly: two caches per model, one
at 600 tokens and one at the end of the stream, stepped alternately for 200 tokens each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from streamify.distill.heal import HealParams, heal
from streamify.eval.streaming import stream_ids
from streamify.io.load import load_checkpoint
from streamify.runtime import disable_streaming, enable_streaming, make_spec
from streamify.runtime.cache import cache_bytes
from streamify.runtime.stream import fresh_cache, stream_chunks

MODEL = "builtin:smollm2-135m"


def pieces(ids: torch.Tensor, chunk: int):
    """Chunks of ``chunk`` tokens, except single tokens over 500-700 and the last 200 (the timed decode)."""
    start, end = 0, ids.numel()
    while start < end:
        timed = 500 <= start < 700 or start >= end - 200
        size = 1 if timed else min(chunk, 500 - start if start < 500 else end - 200 - start)
        yield ids[start : start + size]
        start += size


def run_stream(model, ids: torch.Tensor, chunk: int) -> dict:
    """Stream ``ids``; perplexity, cache bytes, and per-token decode latency at ~600 tokens and at the end."""
    stats = list(stream_chunks(model, pieces(ids, chunk)))
    nll = sum(s.nll_sum for s in stats) / sum(s.scored for s in stats)
    early = [s.seconds for s in stats if 500 <= s.start < 700]
    late = [s.seconds for s in stats if s.start >= ids.numel() - 200]
    at_600 = next(s for s in stats if s.start >= 600)
    return {
        "perplexity": round(math.exp(nll), 3),
        "cache_bytes_at_600": at_600.cache_bytes,
        "cache_bytes_last": stats[-1].cache_bytes,
        "ms_at_600": round(1000 * sum(early) / len(early), 3),
        "ms_last": round(1000 * sum(late) / len(late), 3),
    }


@torch.inference_mode()
def interleaved_latency(model, ids: torch.Tensor, early: int, steps: int, chunk: int) -> dict:
    """Per-token decode latency at ``early`` tokens vs at the end of ``ids``, measured interleaved.

    Two caches on one model: one filled with ``early`` tokens, one with all but the last ``steps``.
    Then single-token steps alternate between them, so machine noise hits both alike.
    """
    late_start = ids.numel() - steps
    caches = {"early": fresh_cache(model), "late": fresh_cache(model)}
    for name, length in (("early", early), ("late", late_start)):
        for start in range(0, length, chunk):
            model(ids[None, start : min(start + chunk, length)], past_key_values=caches[name], use_cache=True)
    seconds = {"early": 0.0, "late": 0.0}
    for k in range(steps):
        for name, position in (("early", early + k), ("late", late_start + k)):
            began = time.perf_counter()
            model(ids[None, position : position + 1], past_key_values=caches[name], use_cache=True)
            seconds[name] += time.perf_counter() - began
    return {
        "ms_early": round(1000 * seconds["early"] / steps, 3),
        "ms_late": round(1000 * seconds["late"] / steps, 3),
        "late_vs_early": round(seconds["late"] / seconds["early"], 3),
        "cache_bytes_early": cache_bytes(caches["early"]),
        "cache_bytes_late": cache_bytes(caches["late"]),
    }


def latency_table(base, tokenizer, variants: dict, tokens: int, chunk: int) -> None:
    """``--latency``: the interleaved decode-latency comparison for every variant (weights do not matter)."""
    ids = stream_ids(tokenizer, "builtin:pydoc", tokens)
    rows = []
    for name, spec in {"full attention": None, **variants}.items():
        model = copy.deepcopy(base)
        if spec is not None:
            enable_streaming(model, spec)
        rows.append({"variant": name, **interleaved_latency(model, ids, 600, 200, chunk)})
        print(rows[-1], flush=True)
    print("\n| variant | ms/token at 600 | ms/token at the end | end / 600 | cache at 600 | cache at the end |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['ms_early']:.2f} | {row['ms_late']:.2f} | {row['late_vs_early']:.3f}× | "
            f"{row['cache_bytes_early'] / 2**20:.1f} MiB | {row['cache_bytes_late'] / 2**20:.1f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heal-steps", type=int, default=120)
    parser.add_argument("--heal-seq-len", type=int, default=1024)
    parser.add_argument("--heal-lr", type=float, default=2e-4)
    parser.add_argument("--chunk", type=int, default=16, help="tokens per step outside the timed windows")
    parser.add_argument("--latency", action="store_true", help="only the interleaved decode-latency table")
    parser.add_argument("--only", default=None, help="run only the variants whose name contains this (and full)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    checkpoint = load_checkpoint(MODEL)
    base, tokenizer = checkpoint.model, checkpoint.tokenizer
    layers = base.config.num_hidden_layers
    ids = stream_ids(tokenizer, "builtin:pydoc", args.tokens)
    variants = {
        "window only (0 sinks)": make_spec(0, args.window, "none", layers),
        f"4 sinks + window {args.window}": make_spec(4, args.window, "none", layers),
        "middle-third hybrid": make_spec(4, args.window, "middle-third", layers),
    }
    if args.only:
        variants = {name: spec for name, spec in variants.items() if args.only in name}
    if args.latency:
        latency_table(base, tokenizer, variants, args.tokens, args.chunk)
        return
    heal_params = HealParams(
        steps=args.heal_steps, lr=args.heal_lr, grad_accum=1, warmup_steps=max(1, args.heal_steps // 20)
    )
    rows = []
    started = time.perf_counter()
    print(f"full attention over {args.tokens} tokens", flush=True)
    rows.append({"variant": "full attention", "healed": False, **run_stream(base, ids, args.chunk)})
    print(rows[-1], flush=True)
    for name, spec in variants.items():
        for healed in (False, True):
            model = copy.deepcopy(base)
            enable_streaming(model, spec)
            metrics = {}
            if healed:
                if not args.heal_steps:
                    continue
                model, metrics = heal(
                    model, base, tokenizer, heal_params, seq_len=args.heal_seq_len, data="builtin:pydoc", seed=0
                )
                disable_streaming(model)
                enable_streaming(model, spec)
            row = {"variant": name, "healed": healed, **run_stream(model, ids, args.chunk)}
            row.update(
                {k: metrics[k] for k in ("heal_tokens", "heldout_kl_before", "heldout_kl_after") if k in metrics}
            )
            rows.append(row)
            print(row, flush=True)
            del model
    full = rows[0]
    for row in rows:
        row["ppl_vs_full"] = round(row["perplexity"] / full["perplexity"], 4)
        row["late_vs_600_latency"] = round(row["ms_last"] / row["ms_at_600"], 3)
    result = {
        "model": MODEL,
        "tokens": args.tokens,
        "window": args.window,
        "heal": heal_params.model_dump(),
        "heal_seq_len": args.heal_seq_len,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    print()
    print(
        "| variant | healed | perplexity | vs full | cache at 600 | cache at end "
        "| ms/token at 600 | ms/token at end | end/600 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {'yes' if row['healed'] else 'no'} | {row['perplexity']:.3f} | "
            f"{row['ppl_vs_full']:.3f}× | {row['cache_bytes_at_600'] / 2**20:.1f} MiB | "
            f"{row['cache_bytes_last'] / 2**20:.1f} MiB | {row['ms_at_600']:.2f} | {row['ms_last']:.2f} | "
            f"{row['late_vs_600_latency']:.2f}× |"
        )


if __name__ == "__main__":
    main()
