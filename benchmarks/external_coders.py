"""Run ZipNN and DFloat11's Huffman code on a raw BF16 buffer; prints one JSON object.

Runs in its own virtual environment (zipnn and dfloat11 are not streamify dependencies);
``entropy_coding.py`` creates that environment and calls this script with the buffer's path.
"""

import json
import sys
import time

import numpy as np


def zipnn_runs(raw: bytes, threads: int, repeats: int) -> dict:
    from zipnn import ZipNN

    coder = ZipNN(bytearray_dtype="bfloat16", threads=threads)
    encode, decode, size = [], [], 0
    for _ in range(repeats):
        fresh = bytearray(raw)  # zipnn reorders the bits of its input buffer in place
        started = time.perf_counter()
        packed = coder.compress(fresh)
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        restored = coder.decompress(packed)
        decode.append(time.perf_counter() - started)
        if bytes(restored) != raw:
            raise SystemExit("zipnn round trip is not exact")
        size = len(packed)
    return {"stored_bytes": size, "encode_seconds": min(encode), "decode_seconds": min(decode)}


def dfloat11_ratio(raw: bytes) -> dict:
    import importlib.util

    import torch

    # dfloat11/__init__ imports its CUDA kernels (cupy); its codec helpers run on the CPU, so load them alone.
    package = importlib.util.find_spec("dfloat11")
    if package is None:
        raise ImportError("dfloat11 is not installed")
    path = next(iter(package.submodule_search_locations)) + "/dfloat11_utils.py"
    spec = importlib.util.spec_from_file_location("dfloat11_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    get_codec = utils.get_codec

    weights = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
    codec, counter = get_codec(weights)
    table = codec.get_code_table()
    exponent_bits = sum(count * table[symbol][0] for symbol, count in counter.items())
    stored = exponent_bits / 8 + weights.numel()  # Huffman-coded exponents + raw sign/mantissa byte
    return {"stored_bytes": int(stored), "note": "its Huffman code's size; excludes its GPU block index"}


def main() -> None:
    path, repeats = sys.argv[1], int(sys.argv[2])
    raw = np.fromfile(path, dtype=np.uint8).tobytes()
    result = {f"zipnn_{t}": zipnn_runs(raw, t, repeats) for t in (1, 2)}
    try:
        result["dfloat11"] = dfloat11_ratio(raw)
    except ImportError as exc:
        result["dfloat11"] = {"error": str(exc)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
