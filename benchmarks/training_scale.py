"""Healing SmolLM2-135M: the teacher as a copy against adapters disabled, and 1 against 2 processes.

Usage:  .venv/bin/python benchmarks/training_scale.py [--steps 10] [--window 512] [--json out.json]

Every variant is ``streamify run`` on a recipe in a fresh process (its peak RSS is the largest of the
processes it started, ``RUSAGE_CHILDREN``), healing a 4-sink streaming SmolLM2 with LoRA rank 16 for
``--steps`` steps of 2 micro-batches at the default length 2 x (sinks + window), no stage cache:

- adapters: ``convert.streaming`` with ``heal``: the teacher is the model itself, adapters off;
- copy: ``convert.streaming`` then ``distill.heal`` with ``teacher: builtin:smollm2-135m``, a second model;
- 2 processes: the adapters recipe under ``torchrun --nproc_per_node 2`` (DDP over gloo, one micro-batch
  per process and step, one thread each), its artifact compared with the 1-process one.

On a 2-core machine two processes do not train faster (they share the cores): the point is the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

BIN = Path(sys.executable).parent
MEASURE = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def recipe(folder: Path, name: str, steps: int, window: int, copy: bool) -> Path:
    heal = {"steps": steps, "grad_accum": 2, "warmup_steps": 1, "eval_blocks": 2}
    streaming = {"sinks": 4, "window": window}
    stages = [{"convert.streaming": streaming}, {"distill.heal": {**heal, "teacher": "builtin:smollm2-135m"}}]
    if not copy:
        stages = [{"convert.streaming": {**streaming, "heal": heal}}]
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"model": "builtin:smollm2-135m", "dtype": "fp32", "stages": stages}))
    return path


def run(command: list, out: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, command), f"output={out}", "--no-cache", "--overwrite"],
        capture_output=True,
        text=True,
    )
    code, rss = done.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(f"{command}: exit {code}\n{done.stderr[-2000:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(int(rss) / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        adapters = recipe(folder, "adapters", args.steps, args.window, copy=False)
        copied = recipe(folder, "copy", args.steps, args.window, copy=True)
        streamify = [BIN / "streamify", "run"]
        torchrun = [BIN / "torchrun", "--standalone", "--nproc_per_node=2", "-m", "streamify", "run"]
        variants = [
            ("teacher: adapters disabled, 1 process", [*streamify, adapters], folder / "one"),
            ("teacher: a copy, 1 process", [*streamify, copied], folder / "copy"),
            ("teacher: adapters disabled, 2 processes", [*torchrun, adapters], folder / "two"),
        ]
        for name, command, out in variants:
            row = {"variant": name, "steps": args.steps, "seq_len": 2 * (4 + args.window), **run(command, out)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        one, two = load_file(folder / "one" / "model.safetensors"), load_file(folder / "two" / "model.safetensors")
        gap = max((one[n].float() - two[n].float()).abs().max().item() for n in one)
        rows.append({"variant": "2 processes vs 1: max |weight difference|", "value": gap})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
