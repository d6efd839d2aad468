"""Lossless entropy coding of weight tensors (the codec; the container is in :mod:`streamify.codec.container`).

Two codecs:

- ``pcodec-rotl1`` (BF16, FP16, FP32), with pcodec
  (https://github.com/pcodec/pcodec), which splits each unsigned integer into a
  *bin* (its high, low-entropy bits) coded with tANS and an *offset* (the
  remaining bits) stored raw. Each element is read as an unsigned integer of
  its width and rotated left by one bit, so the sign moves to the lowest bit
  and the exponent to the top; the bins then hold the exponent and the top of
  the mantissa. In trained BF16 weights the exponent carries about 2.6 bits of
  information, so the coded size approaches (8 + 2.6) / 16.
- ``zstd-bytes`` (INT32 words packing eight 4-bit codes, as compressed-tensors'
  ``pack-quantized`` ``weight_packed`` tensors do): the tensor's bytes (two
  codes each), compressed with zstd (level 3), whose Huffman-coded literals
  capture the skewed distribution of INT4 codes. Measured on SmolLM2's INT4
  codes it is smaller than pcodec on the same bytes (3.578 vs 3.588 bits a code)
  and decodes 1.4-1.7x faster.

A tensor's values (elements, or bytes) are cut into chunks of ``chunk_elems``
values, each compressed on its own with an xxh3-64 checksum of its stored bytes
(codec version 2; version 1 used CRC-32, 5x slower, and is still read), so
decoding runs on all cores and a corrupt chunk is named before anything is
decoded from it. A chunk is read straight into the ``bytes`` object pcodec
takes (``os.pread`` from a file: one copy), checked, and decoded into its slice
of the output.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
import zstandard
from pcodec import ChunkConfig, standalone

from streamify.errors import InputError

FLOAT_CODEC = "pcodec-rotl1"
BYTE_CODEC = "zstd-bytes"
ZSTD_LEVEL = 3  # levels 1-9 give the same size on INT4 codes; 3 is zstd's default
CODEC_VERSION = 2  # 2: chunks carry an xxh3-64 checksum; 1: a CRC-32
_CHECKSUM_KEY = {1: "crc32", 2: "xxh3_64"}
CODED_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPE_NAMES = {**CODED_DTYPES, torch.int32: "I32"}
TENSOR_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_CODEC_DTYPES = {FLOAT_CODEC: set(CODED_DTYPES), BYTE_CODEC: {torch.int32}}
_UNIT = {FLOAT_CODEC: "elements", BYTE_CODEC: "bytes"}
_UINT = {2: np.uint16, 4: np.uint32}
_SIGNED = {2: torch.int16, 4: torch.int32}
DEFAULT_CHUNK_ELEMS = 1 << 18  # 256 Ki elements: enough chunks to keep every core busy, same ratio as 1 Mi
MAX_CHUNK_ELEMS = 1 << 26  # 64 Mi elements: a chunk (at most 256 MB of fp32) is read and decoded in one piece
DEFAULT_LEVEL = 8  # pcodec's default: level 12 saves ~0.3% more and encodes 4x slower
MIN_CODED_ELEMS = 4096  # smaller tensors are stored raw: coding them would not pay for their index


def codec_for(name: str, tensor: torch.Tensor) -> str | None:
    """The codec for a checkpoint tensor, or None to store it raw."""
    if tensor.dtype in CODED_DTYPES and tensor.numel() >= MIN_CODED_ELEMS:
        return FLOAT_CODEC
    if tensor.dtype == torch.int32 and name.endswith("weight_packed") and tensor.numel() * 4 >= MIN_CODED_ELEMS:
        return BYTE_CODEC
    return None


class CorruptWeightsError(InputError):
    """A stored chunk does not match its checksum, or does not decode."""


@dataclass
class EncodedTensor:
    """One coded tensor: its index entry (JSON-able) and the bytes of all its chunks."""

    index: dict
    blob: bytes


def checksum(data) -> str:
    """The xxh3-64 checksum of a buffer's bytes, as 16 hex digits (JSON-safe in every reader)."""
    return xxhash.xxh3_64_hexdigest(data)


def checksum_key(codec_version) -> str | None:
    """The chunk field holding the checksum under ``codec_version`` (None: a version this streamify cannot read)."""
    return _CHECKSUM_KEY.get(codec_version) if type(codec_version) is int else None


def checksum_matches(data, key: str, expected) -> bool:
    """Whether ``data``'s checksum of kind ``key`` (``xxh3_64`` or the older ``crc32``) is ``expected``."""
    return (zlib.crc32(data) if key == "crc32" else checksum(data)) == expected


class FileSpan:
    """``length`` bytes of an open file from byte ``start`` on (a coded tensor in container ``path``).

    A chunk is read in one call (chunks are far below Linux's ~2 GiB a read: see :data:`MAX_CHUNK_ELEMS`).
    """

    def __init__(self, fd: int, start: int, length: int, path: str = "") -> None:
        self.fd, self.start, self.length, self.path = fd, start, length, path

    def __len__(self) -> int:
        return self.length

    def read(self, offset: int, length: int) -> bytes:
        """The bytes ``offset .. offset + length`` (fewer at the end of a truncated file)."""
        return os.pread(self.fd, length, self.start + offset)


class _MemorySpan:
    """A coded tensor's bytes in memory, read as :class:`FileSpan` reads a file."""

    path = ""

    def __init__(self, blob: bytes | memoryview | np.ndarray) -> None:
        self.view = memoryview(blob).cast("B")

    def __len__(self) -> int:
        return len(self.view)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.view[offset : offset + length])


def _as_uint(tensor: torch.Tensor) -> np.ndarray:
    width = tensor.element_size()
    return tensor.detach().contiguous().view(-1).cpu().view(_SIGNED[width]).numpy().view(_UINT[width])


def _units(codec: str, tensor: torch.Tensor) -> np.ndarray:
    """A view of ``tensor`` as the units ``codec`` cuts into chunks: elements, or bytes."""
    words = _as_uint(tensor)
    return words.view(np.uint8) if codec == BYTE_CODEC else words


def _values(codec: str, units: np.ndarray) -> np.ndarray:
    """The unsigned integers that ``codec`` compresses for a chunk of ``units`` (floats: rotated left by one)."""
    if codec == BYTE_CODEC:
        return units
    return (units << 1) | (units >> (8 * units.dtype.itemsize - 1))


def _rotate_back_inplace(values: np.ndarray) -> None:
    sign = values << (8 * values.dtype.itemsize - 1)
    values >>= 1
    values |= sign


def encode_tensor(
    tensor: torch.Tensor,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    level: int = DEFAULT_LEVEL,
    threads: int = 1,
    codec: str = FLOAT_CODEC,
) -> EncodedTensor:
    """Code one tensor into independently decodable, checksummed chunks."""
    return encode_many({"t": tensor}, chunk_elems, level, threads, {"t": codec})["t"]


def encode_many(
    tensors: dict[str, torch.Tensor],
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    level: int = DEFAULT_LEVEL,
    threads: int = 1,
    codecs: dict[str, str] | None = None,
) -> dict[str, EncodedTensor]:
    """Code several tensors (each with ``codecs[name]``, floats by default) on one pool of ``threads``."""
    config = ChunkConfig(compression_level=level)
    codecs = {name: (codecs or {}).get(name, FLOAT_CODEC) for name in tensors}
    for name, tensor in tensors.items():
        if tensor.dtype not in _CODEC_DTYPES[codecs[name]]:
            raise ValueError(f"tensor {name}: codec {codecs[name]} does not code {tensor.dtype}")
    values = {name: _units(codecs[name], tensor) for name, tensor in tensors.items()}
    jobs = [(name, start) for name, v in values.items() for start in range(0, v.size, chunk_elems)]

    def encode_chunk(job: tuple[str, int]) -> bytes:
        name, start = job
        chunk = _values(codecs[name], values[name][start : start + chunk_elems])  # one chunk's copy at a time
        if codecs[name] == BYTE_CODEC:
            return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(chunk)
        return standalone.simple_compress(chunk, config)

    coded = dict(zip(jobs, _run(encode_chunk, jobs, threads), strict=True))
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
                    "xxh3_64": checksum(data),
                }
            )
            parts.append(data)
            offset += len(data)
        index = {
            "codec": codecs[name],
            "codec_version": CODEC_VERSION,
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "chunks": chunks,
        }
        encoded[name] = EncodedTensor(index, b"".join(parts))
    return encoded


Blob = bytes | memoryview | np.ndarray | FileSpan


def decode_tensor(name: str, index: dict, blob: Blob, threads: int = 1) -> torch.Tensor:
    """Decode one coded tensor; a checksum or decode failure raises :class:`CorruptWeightsError`."""
    return decode_many([(name, index, blob)], threads)[name]


def decode_many(
    items: list[tuple[str, dict, Blob]], threads: int = 1, into: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Decode several ``(name, index, blob)`` tensors, the chunks of all of them on one pool of ``threads``.

    ``blob``: the tensor's stored bytes in memory, or a :class:`FileSpan` of a file. ``into``: tensors of
    the right dtype and shape to decode into (reused buffers: no fresh pages to fault in), by name.
    """
    outputs, jobs = {}, []
    for name, index, blob in items:
        codec, version = index.get("codec"), index.get("codec_version")
        if codec not in (FLOAT_CODEC, BYTE_CODEC) or checksum_key(version) is None:
            raise InputError(
                f"tensor {name}: codec {codec} v{version} is not one of "
                f"{FLOAT_CODEC}, {BYTE_CODEC} v1-v{CODEC_VERSION}",
                "upgrade streamify",
            )
        dtype = TENSOR_DTYPES.get(index.get("dtype"))
        if dtype is None or dtype not in _CODEC_DTYPES[codec]:
            raise CorruptWeightsError(
                f"tensor {name}: dtype {index.get('dtype')} is not one that {codec} codes", "re-create the artifact"
            )
        out = _output(name, index["shape"], dtype, (into or {}).get(name))
        outputs[name] = (out, dtype, index["shape"])
        span = blob if isinstance(blob, FileSpan) else _MemorySpan(blob)
        values = out.size * (out.itemsize if codec == BYTE_CODEC else 1)
        key = _CHECKSUM_KEY[version]
        check_chunks(f"{_label(span)}tensor {name}", index["chunks"], values, len(span), key)
        jobs += [(name, codec, key, number, chunk, span, out) for number, chunk in enumerate(index["chunks"])]
    _run(_decode_chunk, jobs, threads)
    return {
        name: torch.from_numpy(out.view(np.dtype(f"int{8 * dtype.itemsize}"))).view(dtype).reshape(shape)
        for name, (out, dtype, shape) in outputs.items()
    }


def _output(name: str, shape: list[int], dtype: torch.dtype, buffer: torch.Tensor | None) -> np.ndarray:
    """The unsigned integers a tensor decodes into: ``buffer``'s memory, or a new array."""
    if buffer is None:
        return np.empty(int(np.prod(shape, dtype=np.int64)), dtype=_UINT[dtype.itemsize])
    if buffer.dtype != dtype or list(buffer.shape) != list(shape) or not buffer.is_contiguous():
        raise ValueError(f"tensor {name}: the buffer to decode into is not a contiguous {dtype} {list(shape)}")
    return buffer.view(-1).view(_SIGNED[dtype.itemsize]).numpy().view(_UINT[dtype.itemsize])


def _run(work: Callable, jobs: list, threads: int) -> list:
    """``work`` on every job: in this thread for one thread (a pool's hand-offs cost ~30% on small chunks)."""
    if threads <= 1 or len(jobs) <= 1:
        return [work(job) for job in jobs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, jobs))


_CHUNK_KEYS = ("start", "count", "offset", "length")
_CHECKSUM_TYPE = {"crc32": int, "xxh3_64": str}


def check_chunks(where: str, chunks: list[dict], values: int, blob_bytes: int, checksum_key: str) -> None:
    """The chunks must cover the tensor's values in order, each inside the blob and with its
    ``checksum_key``: else the index is corrupt."""
    position = 0
    for number, chunk in enumerate(chunks):
        valid = isinstance(chunk, dict) and all(type(chunk.get(k)) is int for k in _CHUNK_KEYS)
        valid = valid and type(chunk.get(checksum_key)) is _CHECKSUM_TYPE[checksum_key]
        inside = valid and chunk["offset"] >= 0 and chunk["length"] >= 0
        inside = inside and chunk["offset"] + chunk["length"] <= blob_bytes
        if not inside or chunk["start"] != position or chunk["count"] <= 0:
            raise CorruptWeightsError(
                f"{where}, chunk {number}: the index does not match the stored data", "re-create the artifact"
            )
        position += chunk["count"]
    if position != values:
        raise CorruptWeightsError(
            f"{where}: the index covers {position} of its {values} values", "re-create the artifact"
        )


def _label(span: FileSpan | _MemorySpan) -> str:
    """``"PATH: "`` of the container a span is in (errors name the file to re-create), else nothing."""
    return f"{span.path}: " if span.path else ""


def _decode_chunk(job: tuple[str, str, str, int, dict, FileSpan | _MemorySpan, np.ndarray]) -> None:
    name, codec, key, number, chunk, span, out = job
    last = chunk["start"] + chunk["count"] - 1
    where = f"{_label(span)}tensor {name}, chunk {number} ({_UNIT[codec]} {chunk['start']}..{last})"
    data = span.read(chunk["offset"], chunk["length"])
    if len(data) != chunk["length"] or not checksum_matches(data, key, chunk[key]):
        raise CorruptWeightsError(
            f"{where}: checksum mismatch, the stored bytes are corrupt", "re-create or re-download the artifact"
        )
    values = out.view(np.uint8) if codec == BYTE_CODEC else out
    target = values[chunk["start"] : chunk["start"] + chunk["count"]]
    try:
        if codec == BYTE_CODEC:  # the frame must declare its size, and that size, before anything is allocated
            complete = zstandard.frame_content_size(data) == chunk["count"]
            raw = zstandard.ZstdDecompressor().decompress(data) if complete else b""
            complete = complete and len(raw) == chunk["count"]
            if complete:
                target[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            written = standalone.simple_decompress_into(data, target)
            complete = written.n_processed == chunk["count"] and written.finished
    except Exception as exc:  # pcodec and zstd raise their own errors on bad input
        raise CorruptWeightsError(f"{where}: does not decode ({exc})", "re-create the artifact") from exc
    if not complete:
        raise CorruptWeightsError(f"{where}: decoded to the wrong number of values", "re-create the artifact")
    if codec == FLOAT_CODEC:
        _rotate_back_inplace(target)
