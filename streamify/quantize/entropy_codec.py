"""Lossless entropy coding of floating-point tensors (the codec; the container is in ``entropy_format``).

Each element of ``w`` bytes (BF16/FP16: 2, FP32: 4) is read as an unsigned
integer and rotated left by one bit, so the sign moves to the lowest bit and the
exponent to the top. Those integers are compressed with pcodec
(https://github.com/pcodec/pcodec): it splits each value into a *bin* (the
high, low-entropy bits: the exponent and the top of the mantissa) that it codes
with tANS, and an *offset* (the remaining mantissa bits and the sign) that it
stores as raw bits. In trained BF16 weights the exponent carries about 2.6 bits
of information, so the coded size approaches (8 + 2.6) / 16 of the raw size.

The tensor is cut into chunks of ``chunk_elems`` elements, each compressed on
its own and followed by a CRC-32 of its stored bytes, so decoding runs on all
cores and a corrupt chunk is named before anything is decoded from it.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from pcodec import ChunkConfig, standalone

from streamify.errors import InputError

CODEC = "pcodec-rotl1"
CODEC_VERSION = 1
CODED_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DTYPE_BY_NAME = {v: k for k, v in CODED_DTYPES.items()}
_UINT = {2: np.uint16, 4: np.uint32}
_SIGNED = {2: torch.int16, 4: torch.int32}
DEFAULT_CHUNK_ELEMS = 1 << 18  # 256 Ki elements: enough chunks to keep every core busy, same ratio as 1 Mi
MIN_CODED_ELEMS = 4096  # smaller tensors are stored raw: coding them would not pay for their index


class CorruptWeightsError(InputError):
    """A stored chunk does not match its checksum, or does not decode."""


@dataclass
class EncodedTensor:
    """One coded tensor: its index entry (JSON-able) and the bytes of all its chunks."""

    index: dict
    blob: bytes


def _as_rotated_uint(tensor: torch.Tensor) -> np.ndarray:
    width = tensor.element_size()
    values = tensor.detach().contiguous().view(-1).cpu().view(_SIGNED[width]).numpy().view(_UINT[width])
    return (values << 1) | (values >> (8 * width - 1))


def _rotate_back_inplace(values: np.ndarray) -> None:
    sign = values << (8 * values.dtype.itemsize - 1)
    values >>= 1
    values |= sign


def encode_tensor(
    tensor: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS, level: int = 8, threads: int = 1
) -> EncodedTensor:
    """Code a BF16/FP16/FP32 tensor into independently decodable, checksummed chunks."""
    return encode_many({"t": tensor}, chunk_elems, level, threads)["t"]


def encode_many(
    tensors: dict[str, torch.Tensor],
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    level: int = 8,
    threads: int = 1,
) -> dict[str, EncodedTensor]:
    """Code several tensors, the chunks of all of them spread over one pool of ``threads``."""
    config = ChunkConfig(compression_level=level)
    values = {name: _as_rotated_uint(tensor) for name, tensor in tensors.items()}
    jobs = [(name, start) for name, v in values.items() for start in range(0, v.size, chunk_elems)]

    def encode_chunk(job: tuple[str, int]) -> bytes:
        name, start = job
        return standalone.simple_compress(values[name][start : start + chunk_elems], config)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        coded = dict(zip(jobs, pool.map(encode_chunk, jobs), strict=True))
    encoded = {}
    for name, tensor in tensors.items():
        chunks, parts, offset = [], [], 0
        for start in range(0, values[name].size, chunk_elems):
            data = coded[(name, start)]
            chunks.append(
                {
                    "start": start,
                    "count": min(chunk_elems, values[name].size - start),
                    "offset": offset,
                    "length": len(data),
                    "crc32": zlib.crc32(data),
                }
            )
            parts.append(data)
            offset += len(data)
        index = {
            "codec": CODEC,
            "codec_version": CODEC_VERSION,
            "dtype": CODED_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "chunks": chunks,
        }
        encoded[name] = EncodedTensor(index, b"".join(parts))
    return encoded


def decode_tensor(name: str, index: dict, blob: bytes | memoryview, threads: int = 1) -> torch.Tensor:
    """Decode one coded tensor; a checksum or decode failure raises :class:`CorruptWeightsError`."""
    return decode_many([(name, index, blob)], threads)[name]


def decode_many(items: list[tuple[str, dict, bytes | memoryview]], threads: int = 1) -> dict[str, torch.Tensor]:
    """Decode several ``(name, index, blob)`` tensors, the chunks of all of them on one pool of ``threads``."""
    outputs, jobs = {}, []
    for name, index, blob in items:
        if index.get("codec") != CODEC or index.get("codec_version") != CODEC_VERSION:
            raise InputError(
                f"tensor {name}: codec {index.get('codec')} v{index.get('codec_version')} is not "
                f"{CODEC} v{CODEC_VERSION}",
                "upgrade streamify",
            )
        dtype = DTYPE_BY_NAME[index["dtype"]]
        out = np.empty(int(np.prod(index["shape"], dtype=np.int64)), dtype=_UINT[dtype.itemsize])
        outputs[name] = (out, dtype, index["shape"])
        view = memoryview(blob)
        jobs += [(name, number, chunk, view, out) for number, chunk in enumerate(index["chunks"])]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(_decode_chunk, jobs))
    return {
        name: torch.from_numpy(out.view(np.dtype(f"int{8 * dtype.itemsize}"))).view(dtype).reshape(shape)
        for name, (out, dtype, shape) in outputs.items()
    }


def _decode_chunk(job: tuple[str, int, dict, memoryview, np.ndarray]) -> None:
    name, number, chunk, view, out = job
    where = f"tensor {name}, chunk {number} (elements {chunk['start']}..{chunk['start'] + chunk['count'] - 1})"
    data = view[chunk["offset"] : chunk["offset"] + chunk["length"]]
    if len(data) != chunk["length"] or zlib.crc32(data) != chunk["crc32"]:
        raise CorruptWeightsError(
            f"{where}: checksum mismatch, the stored bytes are corrupt", "re-create or re-download the artifact"
        )
    target = out[chunk["start"] : chunk["start"] + chunk["count"]]
    try:
        written = standalone.simple_decompress_into(bytes(data), target)
    except Exception as exc:  # pcodec raises plain runtime errors on bad input
        raise CorruptWeightsError(f"{where}: does not decode ({exc})", "re-create the artifact") from exc
    if written.n_processed != chunk["count"] or not written.finished:
        raise CorruptWeightsError(f"{where}: decoded to the wrong number of elements", "re-create the artifact")
    _rotate_back_inplace(target)
