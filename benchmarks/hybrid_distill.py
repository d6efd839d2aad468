"""Hybrid SSM distillation on SmolLM2-135M, side by side in one run: the teacher and its Mamba2/attention hybrids.

Usage:  .venv/bin/python benchmarks/hybrid_distill.py [--align-tokens 8192] [--tokens 24576] [--seq-len 256]
                                                      [--stream 8192] [--window 512] [--json out.json]

Variants (all GraniteMoeHybrid, trained by ``distill.hybrid`` on the builtin:pydoc train split with the same
token budget): 25% Mamba (every:4, layers 3, 7, ..., 27: 7 of 30) and 50% Mamba (every:2, 15 of 30), each
from the copy init (MambaInLlama) and from a random init; then the trained 25% copy hybrid with its kept
attention layers as 4 sinks + a window (``--window``), no further training. Reported per variant: held-out
perplexity (the pydoc held-out split, ``--eval-tokens`` in windows of ``--seq-len``) and its ratio to the
teacher's, held-out KL to the teacher; for the teacher, the copy hybrids and the windowed one, decode latency
and cache bytes (keys/values plus Mamba states) at 600 tokens and at the end of a ``--stream``-token stream,
measured interleaved (two caches per model stepped alternately, as in benchmarks/streaming_llm.py).
The Mamba layers run transformers' torch fallback here (no mamba-ssm / causal-conv1d kernels on CPU), which
hides the speed those kernels give on GPUs at long context.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from streaming_llm import interleaved_latency

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.distill.hybrid import HybridParams
from streamify.distill.losses import heldout_kl
from streamify.eval.streaming import stream_ids
from streamify.io.load import load_checkpoint
from streamify.pipeline.registry import StageContext, get_stage
from streamify.progress import Progress
from streamify.runtime import enable_streaming, make_spec

MODEL = "builtin:smollm2-135m"


class Log(Progress):
    def log(self, message: str) -> None:
        print(f"  {message}", flush=True)


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor) -> float:
    nll = sum(model(b[None], labels=b[None]).loss.item() for b in blocks)
    return math.exp(nll / len(blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--align-tokens", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--stream", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps at each position")
    parser.add_argument("--only", default=None, help="train only the variants whose name contains this")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    source = load_checkpoint(MODEL)
    teacher, tokenizer = source.model.eval(), source.tokenizer
    heldout = token_blocks(tokenizer, load_texts("builtin:pydoc", "heldout"), args.seq_len, args.eval_tokens)
    stream = stream_ids(tokenizer, "builtin:pydoc", args.stream)
    rows = [{"variant": "teacher (SmolLM2-135M)", "perplexity": round(perplexity(teacher, heldout), 3)}]
    rows[0].update(interleaved_latency(teacher, stream, 600, args.steps, 256))
    print(rows[0], flush=True)
    stage = get_stage("distill.hybrid")
    windowed = None
    for share, layers in (("25%", "every:4"), ("50%", "every:2")):
        for init in ("copy", "random"):
            name = f"{share} Mamba ({layers}), {init} init"
            if args.only and args.only not in name:
                continue
            params = HybridParams(
                mamba_layers=layers,
                init=init,
                align_tokens=args.align_tokens,
                tokens=args.tokens,
                seq_len=args.seq_len,
                grad_accum=2,
                autocast="bf16",
                warmup_steps=4,
            )
            ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:pydoc", use_cache=False)
            print(f"{share} Mamba, {init} init", flush=True)
            began = time.perf_counter()
            ctx.progress = Log()
            hybrid = stage.run(copy.copy(source), params, ctx).model.eval()
            row = {
                "variant": name,
                "train_seconds": round(time.perf_counter() - began, 1),
                "perplexity": round(perplexity(hybrid, heldout), 3),
                **{k: ctx.metrics.get(k) for k in ("heldout_kl_rewrite", "heldout_kl_aligned", "heldout_kl_after")},
                "align_tokens": ctx.metrics.get("align_tokens"),
                "distill_tokens": ctx.metrics.get("distill_tokens"),
                "parameters": ctx.metrics["parameters_hybrid"],
            }
            if init == "copy":
                row.update(interleaved_latency(hybrid, stream, 600, args.steps, 256))
                if share == "25%":
                    windowed = hybrid
            rows.append(row)
            print(row, flush=True)
    if windowed is None:
        return
    mamba = [i for i, b in enumerate(windowed.model.layers) if b.mamba is not None]
    enable_streaming(windowed, make_spec(4, args.window, "none", len(windowed.model.layers), tuple(mamba)))
    row = {"variant": f"25% Mamba, copy init, attention as 4 sinks + window {args.window}"}
    row["perplexity"] = round(perplexity(windowed, heldout), 3)
    row.update(interleaved_latency(windowed, stream, 600, args.steps, 256))
    rows.append(row)
    print(row, flush=True)
    device = torch.device("cpu")
    for row in rows:
        row["ppl_vs_teacher"] = round(row["perplexity"] / rows[0]["perplexity"], 3)
    with torch.no_grad():  # the windowed hybrid's KL over the held-out blocks (shorter than its window: as trained)
        rows[-1]["heldout_kl_after"] = round(
            heldout_kl(lambda x: windowed(x).logits, lambda x: teacher(x).logits, heldout[:4], device), 6
        )
    result = {"model": MODEL, "args": vars(args), "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    print("\n| variant | perplexity | vs teacher | held-out KL | cache at 600 | cache at end | ms/token at 600 "
          "| ms/token at end | end / 600 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kl = row.get("heldout_kl_after")
        timed = "ms_early" in row
        print(
            f"| {row['variant']} | {row['perplexity']:.2f} | {row['ppl_vs_teacher']:.2f}× | "
            f"{'' if kl is None else f'{kl:.3f}'} | "
            + (
                f"{row['cache_bytes_early'] / 2**20:.2f} MiB | {row['cache_bytes_late'] / 2**20:.2f} MiB | "
                f"{row['ms_early']:.1f} | {row['ms_late']:.1f} | {row['late_vs_early']:.2f}× |"
                if timed
                else "| | | | |"
            )
        )


if __name__ == "__main__":
    main()
