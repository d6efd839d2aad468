"""INT4 calibration (entropy coding, a bf16 cast, depth pruning) of SmolLM2-135M in memory against block by block.

Usage:  .venv/bin/python benchmarks/blockwise_quant.py [--method gptq] [--samples 64] [--seq-len 512]
                                                [--stage int4|entropy|dtype|prune] [--model FOLDER]
                                                [--json out.json]

The model is the built-in SmolLM2-135M as streamify dequantizes it once (fp32 safetensors in the GGUF
cache), unless ``--model`` names another folder of safetensors files. Each path runs ``streamify quantize
int4 MODEL -o OUT --blockwise off|on --no-eval`` (``--stage entropy``: ``streamify quantize entropy``;
``--stage dtype``: ``streamify convert dtype --dtype bf16``; both ignore --method, --samples and
--seq-len; ``--stage prune``: ``streamify prune depth --remove 8`` scored by angular distance on
--samples x --seq-len tokens) in a fresh process that imports torch, transformers and compressed-tensors first and then
records its peak RSS (``VmHWM``) as the baseline; reported: the peak RSS above that baseline, the wall
time of the command, and whether the two artifacts hold the same
tensors (every tensor compared exactly).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRUNED = 8  # blocks removed by --stage prune

RUN = r"""
import re, sys
from pathlib import Path

def peak():
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

import compressed_tensors, torch, transformers  # the run's heavy imports, before the baseline
import streamify.quantize.int4.stage
from streamify.cli.app import main

base = peak()
sys.argv = ["streamify", *sys.argv[1:]]
try:
    main()
finally:
    print(f"PEAK {base} {peak()}", file=sys.stderr)
"""


def run_quantize(model: Path, out: Path, mode: str, args: argparse.Namespace) -> dict:
    """One ``streamify`` run of the stage in a fresh process: peak RSS above its baseline, wall time."""
    group, stage = {"dtype": ("convert", "dtype"), "prune": ("prune", "depth")}.get(
        args.stage, ("quantize", args.stage)
    )
    command = [sys.executable, "-c", RUN, group, stage, str(model), "-o", str(out)]
    calibration = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if args.stage == "dtype":
        command += ["--dtype", "bf16"]
    if args.stage == "int4":
        command += ["--method", args.method, *calibration]
    if args.stage == "prune":
        command += ["--remove", str(PRUNED), *calibration]
    command += ["--blockwise", mode, "--no-eval"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = re.search(r"PEAK (\d+) (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"{mode}: exit {done.returncode}\n{done.stderr[-3000:]}")
    base, top = map(int, found.groups())
    return {"seconds": round(seconds, 1), "baseline_mib": base >> 20, "peak_above_baseline_mib": (top - base) >> 20}


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two artifacts hold the same tensors: names, dtypes and values."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            found.update(load_file(path))
        return found

    a, b = tensors(first), tensors(second)
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def default_model() -> Path:
    """The built-in SmolLM2-135M as fp32 safetensors (dequantized from its GGUF once, then cached)."""
    from streamify.io.config import gguf_cache_folder
    from streamify.io.load import load_checkpoint
    from streamify.io.source import resolve_source

    load_checkpoint("builtin:smollm2-135m")  # makes the cached folder on first use
    return gguf_cache_folder(resolve_source("builtin:smollm2-135m"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stage", default="int4", choices=["int4", "entropy", "dtype", "prune"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or default_model()
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(prefix="streamify-bench-") as tmp:
        results = {mode: run_quantize(model, Path(tmp) / mode, mode, args) for mode in ("off", "on")}
        identical = same_tensors(Path(tmp) / "off", Path(tmp) / "on")
    report = {
        "model": str(model),
        "model_mib": model_bytes >> 20,
        "stage": args.stage,
        "method": args.method,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "in_memory": results["off"],
        "block_wise": results["on"],
        "same_artifact": identical,
    }
    print(json.dumps(report, indent=2))
    off, on = results["off"], results["on"]
    what = {
        "int4": f"{args.method} {args.samples} x {args.seq_len}",
        "entropy": "entropy coding",
        "prune": f"prune {PRUNED} blocks, angular on {args.samples} x {args.seq_len}",
    }.get(args.stage, "cast to bf16")
    print(
        f"| {what} | {model_bytes >> 20} MiB | "
        f"{off['peak_above_baseline_mib']} MiB, {off['seconds']} s | {on['peak_above_baseline_mib']} MiB, "
        f"{on['seconds']} s | {on['peak_above_baseline_mib'] / off['peak_above_baseline_mib']:.2f}x | "
        f"{'identical' if identical else 'DIFFERENT'} |"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
