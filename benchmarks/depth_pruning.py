"""Depth pruning of SmolLM2-135M (30 -> 23 blocks), side by side in one run.

Usage:  .venv/bin/python benchmarks/depth_pruning.py [--remove 7] [--heal-tokens 500000 2000000]
                                                     [--eval-tokens 16384] [--loss-samples 2] [--heal-autocast bf16]
                                                     [--json out.json]

Rows: the teacher; each metric without healing (bi = ShortGPT, angular = Gromov et al., streamline =
LLM-Streamline's span replaced by one block trained on hidden-state MSE, loss = greedy held-out loss);
then the best unhealed metric healed with LoRA (KL to the teacher) for each token budget. Perplexity
is on the held-out split of builtin:pydoc (healing and scoring use the train split); wall time per row.
Scores use 8 calibration sequences of 512 tokens; the greedy loss metric, which runs one forward pass per
candidate block per round, uses the first --loss-samples of them (its cost grows with that number).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.distill.heal import HealParams, heal
from streamify.eval.perplexity import perplexity
from streamify.io.load import load_checkpoint
from streamify.progress import SILENT
from streamify.prune.depth import DepthParams, replace_span
from streamify.prune.scores import select_blocks
from streamify.prune.surgery import remove_blocks

MODEL = "builtin:smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", type=int, default=7)
    parser.add_argument("--heal-tokens", type=int, nargs="*", default=[500_000, 2_000_000])
    parser.add_argument("--heal-seq-len", type=int, default=512)
    parser.add_argument("--heal-autocast", choices=["off", "bf16"], default="off", help="bf16 mixed precision")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--loss-samples", type=int, default=2, help="calibration sequences for the loss metric")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    checkpoint = load_checkpoint(MODEL)
    teacher, tokenizer = checkpoint.model, checkpoint.tokenizer
    heldout = token_blocks(tokenizer, load_texts("builtin:pydoc", "heldout"), 512, args.eval_tokens)
    calibration = token_blocks(tokenizer, load_texts("builtin:pydoc", "train"), 512, 8 * 512, seed=0)
    rows = [{"variant": "teacher (30 blocks)", **_ppl(teacher, heldout), "seconds": 0.0}]
    print(rows[-1], flush=True)
    pruned_by_metric = {}
    for metric in ("bi", "angular", "streamline", "loss"):
        started = time.perf_counter()
        model = copy.deepcopy(teacher)
        scored_on = calibration[: args.loss_samples] if metric == "loss" else calibration
        chosen, _ = select_blocks(model, scored_on, metric, args.remove, protect_ends=True)
        if metric == "streamline":
            params = DepthParams(remove=args.remove, replace=True, replace_steps=200)
            replace_span(model, teacher, chosen, calibration, params, seed=0, progress=SILENT)
        else:
            remove_blocks(model, chosen)
        row = {"variant": f"{metric}, no healing", "removed": chosen, **_ppl(model, heldout)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        pruned_by_metric[metric] = (model, row["perplexity"])
        print(row, flush=True)
    best = min(pruned_by_metric, key=lambda m: pruned_by_metric[m][1])
    for tokens in args.heal_tokens:
        started = time.perf_counter()
        steps = max(1, tokens // (4 * args.heal_seq_len))
        warmup = max(1, steps // 20)
        params = HealParams(steps=steps, lr=2e-4, grad_accum=4, warmup_steps=warmup, autocast=args.heal_autocast)
        model, metrics = heal(
            copy.deepcopy(pruned_by_metric[best][0]),
            teacher,
            tokenizer,
            params,
            seq_len=args.heal_seq_len,
            data="builtin:pydoc",
            seed=0,
        )
        row = {
            "variant": f"{best}, healed {metrics['heal_tokens']:,} tokens",
            **_ppl(model, heldout),
            "heldout_kl_before": metrics["heldout_kl_before"],
            "heldout_kl_after": metrics["heldout_kl_after"],
        }
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(row, flush=True)
    for row in rows:
        row["vs_teacher"] = round(row["perplexity"] / rows[0]["perplexity"], 3)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": MODEL, "remove": args.remove, "rows": rows}, handle, indent=2)
    print("\n| variant | removed blocks | held-out perplexity | vs teacher | wall time (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        removed = ", ".join(map(str, row.get("removed", []))) or "-"
        print(
            f"| {row['variant']} | {removed} | {row['perplexity']:.2f} | {row['vs_teacher']:.3f}× | "
            f"{row['seconds']:.0f} |"
        )


def _ppl(model, blocks) -> dict:
    return {"perplexity": round(perplexity(model, blocks)["perplexity"], 3)}


if __name__ == "__main__":
    main()
