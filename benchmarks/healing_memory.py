"""Peak memory and time of one healing step on SmolLM2-135M under sinks + window, this tree against another.

Usage:  .venv/bin/python benchmarks/healing_memory.py --baseline-tree /tmp/old [--windows 512,2048,4096]
                                                      [--limit-gib 20] [--skip-baseline] [--json out.json]
        (/tmp/old: a checkout of an earlier streamify, e.g. ``git worktree add /tmp/old 6ae7f14``)

Each measurement runs in a fresh process (PYTHONPATH set to the tree measured) under an address-space
limit of ``--limit-gib``: one training step of healing as ``convert streaming --heal-steps`` runs it (LoRA
rank 16 on every linear layer but the head, KL to the model itself with its adapters off and full
attention, batch 1) at the default healing length 2 x (sinks + window), 4 sinks, without and with
transformers' gradient checkpointing (``gradient_checkpointing: true`` of healing). Reported: the process's
peak RSS (``ru_maxrss``) and the step's wall time, or "out of memory" when an allocation failed under the
limit. The full-attention teacher pass runs under no_grad in both trees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, resource, sys, time
limit = int(float(sys.argv[2]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
from streamify.distill.heal import _teacher_logits
from streamify.distill.lora import add_lora
from streamify.distill.losses import kl_to_teacher
from streamify.io.load import load_checkpoint
from streamify.model.patterns import select_modules
from streamify.runtime import enable_streaming, make_spec

window = int(sys.argv[1])
model = load_checkpoint("builtin:smollm2-135m", dtype="fp32").model
enable_streaming(model, make_spec(4, window, "none", model.config.num_hidden_layers))
trainee = add_lora(model, 16, 32, select_modules(model, None, [], "bench"))
if sys.argv[3] == "1":
    trainee.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
trainee.train()
teacher = _teacher_logits(None, model, trainee)
ids = torch.randint(0, model.config.vocab_size, (1, 2 * (4 + window)), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
try:
    with torch.no_grad():
        target = teacher(ids)
    loss = kl_to_teacher(trainee(ids).logits, target, 1.0)
    loss.backward()
    result = {"seconds": round(time.perf_counter() - start, 2)}
except (RuntimeError, MemoryError) as exc:
    result = {"error": "out of memory" if "memory" in str(exc).lower() else str(exc)[:200]}
result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
print(json.dumps(result))
"""


def measure(tree: Path, window: int, limit_gib: float, checkpointing: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-c", STEP, str(window), str(limit_gib), str(int(checkpointing))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", type=Path, help="checkout of the streamify to compare")
    parser.add_argument("--skip-baseline", action="store_true", help="measure this tree only")
    parser.add_argument("--windows", default="512,2048,4096")
    parser.add_argument("--limit-gib", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.baseline_tree is None and not args.skip_baseline:
        parser.error("give --baseline-tree (or --skip-baseline)")
    here = Path(__file__).resolve().parent.parent
    rows = []
    for window in [int(w) for w in args.windows.split(",")]:
        for checkpointing in (False, True):
            trees = [("this tree", here)]
            if not args.skip_baseline:
                trees.insert(0, ("baseline", args.baseline_tree.resolve()))
            for name, tree in trees:
                row = {"window": window, "seq_len": 2 * (4 + window), "tree": name}
                row |= {"gradient_checkpointing": checkpointing, **measure(tree, window, args.limit_gib, checkpointing)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
