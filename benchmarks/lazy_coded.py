"""Running SmolLM2 from its entropy-coded weights, lazily, against the same model loaded eagerly in BF16.

Usage:  .venv/bin/python benchmarks/lazy_coded.py [--windows 8] [--seq-len 512] [--batches 1,2] [--new-tokens 32]
        [--json out.json]

Writes four artifacts of builtin:smollm2-135m into a temporary folder: BF16 safetensors
(`streamify convert dtype --dtype bf16`), the same weights entropy-coded
(`streamify quantize entropy --dtype bf16`), INT4 (`streamify quantize int4 --method rtn`, group 64,
compressed-tensors) and the same INT4 entropy-coded (`--entropy`). Each row is measured in a fresh process: peak RSS
(VmHWM) above the process's RSS after its imports (torch, transformers, streamify), load time,
prefill throughput (--windows windows of --seq-len tokens, no cache, like `streamify eval`; one table for each
number of windows a forward pass takes, as `eval --batch-size` gives it: a lazy pass decodes each block once for
all of them) and greedy
generation throughput (--new-tokens from a 16-token prompt, transformers' cache). Rows:
eager BF16 (the anchor of every ratio), lazy from the BF16 safetensors (block by block, no decoding), lazy
from the coded container (each block decoded while the one before runs); eager INT4 (transformers with
compressed-tensors), lazy INT4 (each block's codes read and dequantized while the one before runs), lazy
from the coded INT4 container. The logits of the first window are compared with the eager row of the same
weights (bit-exact expected).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {  # name: (artifact, lazy, the row whose logits it must give)
    "eager BF16 (safetensors)": ("bf16", False, "eager BF16 (safetensors)"),
    "lazy BF16 (safetensors, block by block)": ("bf16", True, "eager BF16 (safetensors)"),
    "lazy entropy-coded (decoded block by block)": ("coded", True, "eager BF16 (safetensors)"),
    "eager INT4 (compressed-tensors)": ("int4", False, "eager INT4 (compressed-tensors)"),
    "lazy INT4 (dequantized block by block)": ("int4", True, "eager INT4 (compressed-tensors)"),
    "lazy INT4 entropy-coded (decoded, dequantized)": ("int4-coded", True, "eager INT4 (compressed-tensors)"),
}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(
    folder: str, lazy: bool, windows: int, seq_len: int, new_tokens: int, logits_out: str, batch: int = 1
) -> None:
    """One measurement, in this (fresh) process; prints one JSON line."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401 (imported before the baseline, as the others)

    import streamify
    import streamify.io.load

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (windows, seq_len))
    prompt = ids[:1, :16]
    base = _vm("VmRSS")
    started = time.perf_counter()
    model, _ = streamify.load(folder, lazy=lazy)
    load_s = time.perf_counter() - started
    with torch.inference_mode():
        started = time.perf_counter()
        for row in range(0, windows, batch):
            logits = model(ids[row : row + batch]).logits
            if row == 0:
                torch.save(logits[:1], logits_out)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        generate_s = time.perf_counter() - started
    print(json.dumps({
        "peak_rss_bytes": _vm("VmHWM") - base,
        "load_s": load_s,
        "prefill_tokens_per_s": windows * seq_len / prefill_s,
        "generate_tokens_per_s": (out.shape[1] - prompt.shape[1]) / generate_s,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 2],
        help="one table per number of windows a prefill forward pass takes (eval --batch-size)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "LAZY", "LOGITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, lazy, logits = args.child
        child(folder, lazy == "1", args.windows, args.seq_len, args.new_tokens, logits, args.batch)
        return
    streamify = [sys.executable, "-m", "streamify"]
    with tempfile.TemporaryDirectory(prefix="streamify-lazy-bench-") as tmp:
        folders = {name: Path(tmp) / name for name in ("bf16", "coded", "int4", "int4-coded")}
        common = ["--no-eval", "--format", "quiet"]
        commands = {
            "bf16": ["convert", "dtype", "--dtype", "bf16"],
            "coded": ["quantize", "entropy", "--dtype", "bf16"],
            "int4": ["quantize", "int4", "--method", "rtn"],
            "int4-coded": ["quantize", "int4", "--method", "rtn", "--entropy"],
        }
        for which, command in commands.items():
            subprocess.run([*streamify, *command, "builtin:smollm2-135m", "-o", folders[which], *common], check=True)
        tables = {batch: measure(folders, Path(tmp), batch, args) for batch in args.batches}
    for batch, results in tables.items():
        print_table(results, batch, args)
    if args.json:
        args.json.write_text(json.dumps({f"batch {batch}": results for batch, results in tables.items()}, indent=2))


def measure(folders: dict[str, Path], tmp: Path, batch: int, args: argparse.Namespace) -> dict:
    """Every row of :data:`ROWS` in a fresh process, prefilling ``batch`` windows a forward pass."""
    import torch

    results = {}
    for name, (which, lazy, _) in ROWS.items():
        logits = tmp / f"{which}-{int(lazy)}-{batch}.pt"
        sizes = [
            "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--new-tokens", str(args.new_tokens),
            "--batch", str(batch),
        ]  # fmt: skip
        out = subprocess.run(
            [sys.executable, __file__, *sizes, "--child", str(folders[which]), str(int(lazy)), str(logits)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        results[name]["logits"] = logits
        print(f"batch {batch}, {name}: {results[name]}", file=sys.stderr)
    for name, row in results.items():
        reference = torch.load(results[ROWS[name][2]]["logits"])
        row["logits_equal_to_eager"] = bool(torch.equal(torch.load(row["logits"]), reference))
    for row in results.values():
        row.pop("logits")
    return results


def print_table(results: dict, batch: int, args: argparse.Namespace) -> None:
    anchor = next(iter(results.values()))
    print(
        f"\n{args.windows} windows x {args.seq_len} tokens prefill, {batch} a forward pass; "
        f"{args.new_tokens} new tokens generated\n"
    )
    print("| run | peak RSS above imports | vs eager | prefill tokens/s | vs eager | generate tokens/s | vs eager "
          "| load s | logits equal to eager |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['peak_rss_bytes'] / 2**20:,.0f} MiB "
            f"| {row['peak_rss_bytes'] / anchor['peak_rss_bytes']:.2f}x "
            f"| {row['prefill_tokens_per_s']:,.0f} "
            f"| {row['prefill_tokens_per_s'] / anchor['prefill_tokens_per_s']:.2f}x "
            f"| {row['generate_tokens_per_s']:.1f} "
            f"| {row['generate_tokens_per_s'] / anchor['generate_tokens_per_s']:.2f}x "
            f"| {row['load_s']:.2f} | {'yes' if row['logits_equal_to_eager'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
