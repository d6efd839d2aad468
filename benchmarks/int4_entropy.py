"""Entropy coding of INT4 weight codes on SmolLM2-135M: stored bits per weight, side by side.

Usage:  .venv/bin/python benchmarks/int4_entropy.py [--methods rtn gptq] [--group-sizes 32 64]
                                                    [--repeats 3] [--json out.json]

For each method and group size, quantize.int4 writes a plain compressed-tensors artifact (eight 4-bit codes
per INT32 word in ``*.weight_packed``); its files are then coded the way ``quantize int4 --entropy`` codes
them (``code_checkpoint``). On the same packed code bytes, side by side: plain (4 bits), the order-0 entropy
of each tensor's codes (the floor of any coder that sees one code at a time), streamify's coded size,
zstd -3 and zstd -19; then the bits per weight with the scales; decode throughput of the packed bytes
(GB/s of INT32 words, best of --repeats) with 1 and 2 threads. GPTQ calibrates in bf16 (64 x 512 tokens).
Needs the bench extra: .venv/bin/pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from entropy_coding import best, zstd_runs
from safetensors.torch import load_file

from streamify.codec.codec import DEFAULT_CHUNK_ELEMS, DEFAULT_LEVEL, decode_many
from streamify.codec.container import code_checkpoint
from streamify.io.artifact import save_model_files
from streamify.io.load import load_checkpoint
from streamify.pipeline.registry import StageContext, get_stage
from streamify.progress import SILENT
from streamify.quantize.int4.stage import Int4Params

MODEL = "builtin:smollm2-135m"


def code_entropy_bits(packed: torch.Tensor) -> float:
    """Order-0 entropy (bits) of one tensor's 4-bit codes, summed over the codes."""
    words = packed.contiguous().view(-1).numpy().view(np.uint32)
    codes = ((words[:, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 0xF).ravel()
    counts = np.bincount(codes, minlength=16).astype(np.float64)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def run(method: str, group: int, repeats: int) -> dict:
    checkpoint = load_checkpoint(MODEL)
    ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:pydoc", progress=SILENT)
    params = Int4Params(method=method, group_size=group, calibration_dtype="bf16")
    checkpoint = get_stage("quantize.int4").run(checkpoint, params, ctx)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp)
        save_model_files(checkpoint, plain)
        tensors = load_file(plain / "model.safetensors")
        coded = code_checkpoint(
            lambda folder: shutil.copytree(plain, folder, dirs_exist_ok=True),
            DEFAULT_LEVEL,
            DEFAULT_CHUNK_ELEMS,
            os.cpu_count() or 1,
            SILENT,
        )
    packed = sorted(name for name in tensors if name.endswith("weight_packed"))
    modules = {name.rpartition(".")[0] for name in packed}
    weights = sum(tensors[name].numel() * 8 for name in packed)
    stored = coded.stored_bytes()
    items = [(name, coded.index[name], coded.stored(name)) for name in packed]
    raw_bytes = sum(tensors[name].numel() * 4 for name in packed)
    row = {"method": method, "group_size": group, "weights": weights}
    decoded = {}
    for threads in (1, 2):
        seconds = best(lambda threads=threads: decoded.update(decode_many(items, threads)), repeats)
        if any(not torch.equal(decoded[name], tensors[name]) for name in packed):
            raise SystemExit("INT4 code round trip is not exact")
        row[f"decode_gb_per_s_{threads}"] = raw_bytes / seconds / 1e9
    joined = b"".join(tensors[name].numpy().tobytes() for name in packed)
    row["code_bits"] = {
        "plain": 4.0,
        "order-0 entropy": sum(code_entropy_bits(tensors[name]) for name in packed) / weights,
        "streamify": 8 * sum(stored[name] for name in packed) / weights,
        "zstd -3": 8 * zstd_runs(joined, 3, 1)["stored_bytes"] / weights,
        "zstd -19": 8 * zstd_runs(joined, 19, 1)["stored_bytes"] / weights,
    }
    side = [name for name in tensors if name.rpartition(".")[0] in modules and not name.endswith("weight_packed")]
    plain_side = sum(tensors[name].numel() * tensors[name].element_size() for name in side)
    row["bits_per_weight_plain"] = 4 + 8 * plain_side / weights
    row["bits_per_weight_streamify"] = 8 * sum(stored[name] for name in packed + side) / weights
    row["artifact_ratio"] = coded.summary()["ratio"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [run(method, group, args.repeats) for method in args.methods for group in args.group_sizes]
    coders = list(rows[0]["code_bits"])
    print(
        "\n| method, group | quantized weights | "
        + " | ".join(f"code bits: {c}" for c in coders)
        + " | bits/weight with scales: plain → streamify | whole artifact vs plain | decode GB/s (1 / 2 threads) |"
    )
    print("|---" * (len(coders) + 5) + "|")
    for row in rows:
        bits = " | ".join(f"{row['code_bits'][c]:.3f}" for c in coders)
        print(
            f"| {row['method']}, g{row['group_size']} | {row['weights'] / 1e6:.1f} M | {bits} | "
            f"{row['bits_per_weight_plain']:.3f} → {row['bits_per_weight_streamify']:.3f} | "
            f"{row['artifact_ratio']:.2%} | {row['decode_gb_per_s_1']:.2f} / {row['decode_gb_per_s_2']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
