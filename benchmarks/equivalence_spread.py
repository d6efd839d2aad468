"""How much the streaming equivalence check moves between runs, thread counts and CPU kernels.

Usage:  .venv/bin/python benchmarks/equivalence_spread.py [--repeats 3] [--json out.json]

Converts SmolLM2-135M as the suite's real test does (4 sinks, a 64-token window,
the middle third of the layers full), then runs ``streamify eval --check
equivalence --tokens 220`` (the runtime against the independent StreamingLLM
reference: the stock transformers model, token by token) in fresh processes under every combination of 1 or 2
threads and ATen's CPU kernels (``ATEN_CPU_CAPABILITY`` default / avx2 /
avx512: what another machine would run), ``--repeats`` times each. It prints
every run's ``max_abs_diff`` and ``max_rel_diff`` and the spread, and, as the
scale of a real fault, the difference between the sink + window model and the
same weights under full attention (a mask that lets tokens outside the window
through). Tolerances in the tests are set from these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = "builtin:smollm2-135m"
STREAMIFY = [sys.executable, "-m", "streamify"]


def convert(folder: Path) -> Path:
    out = folder / "hybrid"
    args = ["convert", "streaming", MODEL, "-o", str(out), "--window", "64", "--full-layers", "middle-third"]
    subprocess.run([*STREAMIFY, *args, "--no-eval", "--format", "quiet"], check=True)
    return out


def check(artifact: Path, threads: int, capability: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ATEN_CPU_CAPABILITY": capability}
    args = ["eval", str(artifact), "--check", "equivalence", "--tokens", "220", "--format", "json"]
    done = subprocess.run([*STREAMIFY, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)["equivalence"]


def mask_fault(artifact: Path) -> float:
    """max |logit diff| between the sink + window model and the same weights with full attention.

    The size of the difference a mask fault (attending outside the window) makes
    on these tokens: what the check exists to catch.
    """
    import torch

    from streamify.eval.streaming import stream_ids
    from streamify.io.load import load_checkpoint
    from streamify.runtime import disable_streaming

    checkpoint = load_checkpoint(str(artifact))
    ids = stream_ids(checkpoint.tokenizer, "builtin:pydoc", 220)[None]
    with torch.inference_mode():
        streaming = checkpoint.model(ids).logits
        disable_streaming(checkpoint.model)
        full = checkpoint.model(ids).logits
    return (streaming - full).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = convert(Path(tmp))
        for capability in ("default", "avx2", "avx512"):
            for threads in (1, 2):
                for repeat in range(args.repeats):
                    found = check(artifact, threads, capability)
                    runs.append({"capability": capability, "threads": threads, "repeat": repeat, **found})
                    print(
                        f"{capability:8} threads={threads} run {repeat}: max_abs_diff {found['max_abs_diff']:.3e} "
                        f"max_rel_diff {found['max_rel_diff']:.3e} (max |logit| {found['max_abs_logit']:.2f}) "
                        f"per chunk {found['per_chunk']}",
                        flush=True,
                    )
        fault = mask_fault(artifact)
    diffs = [r["max_abs_diff"] for r in runs]
    relative = [r["max_rel_diff"] for r in runs]
    summary = {
        "runs": len(runs),
        "max_abs_diff": {"min": min(diffs), "max": max(diffs)},
        "max_rel_diff": {"min": min(relative), "max": max(relative)},
        "distinct_results": len({round(d, 12) for d in diffs}),
        "mask_fault_max_abs_diff": fault,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
