"""The container of entropy-coded weights: ``model.entropy.safetensors``.

One container per file of the coded checkpoint: ``X.safetensors`` is coded into
``X.entropy.safetensors`` (a sharded checkpoint gives one container per shard,
each with the index of its own tensors; a reader takes every
``*.entropy.safetensors`` file of the folder, and refuses a tensor or an
original file found in two of them).

Format (version 3), so that another implementation can read it:

- A safetensors file. Every tensor of the checkpoint is stored under its own
  name, either *coded* (a 1-D ``U8`` tensor: the concatenated chunks written by
  :mod:`streamify.codec.codec`) or *raw* (the tensor itself, in its
  own dtype: tensors under 4096 values, and integer and bool tensors other than
  INT4 codes packed in INT32 ``*weight_packed`` tensors).
- ``__metadata__["streamify_entropy"]`` is a JSON string (the index)::

    {"format": "streamify.entropy", "format_version": 3,
     "files": {"model.safetensors": {"metadata": {...}}},   # the original files and their __metadata__
     "tensors": {NAME: {"file": "model.safetensors", "storage": "coded" | "raw",
                        "dtype": "BF16" | ..., "shape": [...],   # of the original tensor
                        # raw only:
                        "xxh3_64": xxh3-64 of the stored bytes, 16 hex digits,
                        # coded only:
                        "codec": "pcodec-rotl1" | "zstd-bytes", "codec_version": 2,
                        "chunks": [{"start": first value, "count": values,
                                    "offset": byte offset in the U8 tensor, "length": bytes,
                                    "xxh3_64": xxh3-64 of those bytes, 16 hex digits}, ...]}}}

  and ``__metadata__["streamify_entropy_sha256"]`` the hex sha256 of that string,
  so every stored byte is covered by a checksum: the index by its sha256, each
  coded chunk and each raw tensor by its xxh3-64 (XXH3_64bits, seed 0).
  Version 2 (still read) had ``crc32`` (zlib's CRC-32, an integer) in place of
  ``xxh3_64`` on raw tensors, and coded tensors of ``codec_version`` 1 have it on
  their chunks.
- File names in ``files`` are plain names of ``.safetensors`` files (no folders);
  every tensor of the container has an index entry and every entry a tensor
  whose dtype and shape agree with it. A reader refuses anything else before it
  writes a byte.
- Values: ``pcodec-rotl1`` codes one value per element (unsigned integers of the
  dtype's width); ``zstd-bytes`` codes the tensor's little-endian bytes, each
  chunk one zstd frame; ``start`` and ``count`` are then in bytes.
- Decoding a chunk: check its checksum; for ``pcodec-rotl1`` pcodec-decompress it
  (``simple_decompress``) into ``count`` unsigned integers, rotate each right by
  one bit and reinterpret the bits as the dtype; for ``zstd-bytes``
  zstd-decompress it into ``count`` bytes of the tensor. Restoring a file writes
  its tensors, in name order, with its original ``__metadata__``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamify.codec.codec import (
    DEFAULT_CHUNK_ELEMS,
    DEFAULT_LEVEL,
    TENSOR_DTYPES,
    CorruptWeightsError,
    FileSpan,
    check_chunks,
    checksum,
    checksum_key,
    checksum_matches,
    codec_for,
    decode_many,
    encode_many,
)
from streamify.errors import InputError
from streamify.io.safetensors_file import DTYPE_BYTES, aligned_order, pread_into, read_header, write_streamed
from streamify.progress import Progress

CONTAINER_SUFFIX = ".entropy.safetensors"
CONTAINER_NAME = "model" + CONTAINER_SUFFIX  # the container of a checkpoint saved in one file
FORMAT = "streamify.entropy"
FORMAT_VERSION = 3
_RAW_CHECKSUM_KEY = {2: "crc32", 3: "xxh3_64"}  # the checksum of raw tensors by format version
_META_KEY = "streamify_entropy"
_DIGEST_KEY = "streamify_entropy_sha256"
_RECREATE = "the container is damaged or was altered: re-create or re-download the artifact"
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                       torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0", torch.uint16: "U16",
                       torch.uint32: "U32", torch.uint64: "U64"}  # fmt: skip
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


GROUP_BYTES = 32 << 20  # tensors are read and coded in groups of about this many bytes: parallel, bounded


class Spool:
    """A container's tensor bytes while it is being coded: raw tensors and coded ones appended to two
    temporary files, so the coded model is never held in memory."""

    def __init__(self) -> None:
        # unnamed files, gone when the spool is (no context manager: they outlive this call)
        self.raw = tempfile.TemporaryFile(prefix="streamify-entropy-raw-")  # noqa: SIM115
        self.coded = tempfile.TemporaryFile(prefix="streamify-entropy-coded-")  # noqa: SIM115
        self.places: dict[str, tuple[bool, str, list[int], int, int]] = {}  # coded?, dtype, shape, start, end

    def add(self, name: str, coded: bool, dtype: str, shape: list[int], data) -> None:
        target = self.coded if coded else self.raw
        start = target.tell()
        target.write(data)
        self.places[name] = (coded, dtype, shape, start, target.tell())

    def read(self, name: str) -> bytearray:
        """The stored bytes of tensor ``name``."""
        coded, _, _, start, end = self.places[name]
        spooled = self.coded if coded else self.raw
        spooled.flush()
        data = bytearray(end - start)
        pread_into(spooled.fileno(), data, start)
        return data

    def close(self) -> None:
        """Delete the spooled bytes (they are in the written container)."""
        self.raw.close()
        self.coded.close()

    def write(self, path: Path, metadata: dict[str, str]) -> None:
        """Write the safetensors file: raw tensors first, in safetensors' aligned order, then the coded ones."""
        layout = [(n, p[1], p[2], p[4] - p[3]) for n, p in self.places.items()]
        raw = aligned_order([item for item in layout if not self.places[item[0]][0]])
        coded = [item for item in layout if self.places[item[0]][0]]
        write_streamed(path, raw + coded, metadata, (self.read(item[0]) for item in raw + coded))


def encode_file(path: Path, level: int, chunk_elems: int, threads: int, spool: Spool) -> tuple[dict, dict]:
    """Code every tensor of one safetensors file into ``spool``, a group of tensors at a time (read with
    pread: neither the file nor the coded result is ever whole in memory).

    Returns ``(index entries by name, the file's entry: its __metadata__)``.
    """
    header = read_header(path)
    with open(path, "rb") as fh:
        (header_length,) = struct.unpack("<Q", fh.read(8))
        entries = [(name, entry) for name, entry in header.items() if name != "__metadata__"]
        entries.sort(key=lambda item: item[1]["data_offsets"])
        index: dict[str, dict] = {}
        group: list[tuple[str, dict, bytearray]] = []
        size = 0
        for name, entry in entries:
            first, last = entry["data_offsets"]
            data = bytearray(last - first)
            if pread_into(fh.fileno(), data, 8 + header_length + first) != len(data):
                raise InputError(f"{path}: tensor {name} could not be read in full", "re-create the checkpoint")
            group.append((name, entry, data))
            size += len(data)
            if size >= GROUP_BYTES:
                index.update(encode_group(path.name, group, spool, level, chunk_elems, threads))
                group, size = [], 0
        index.update(encode_group(path.name, group, spool, level, chunk_elems, threads))
    return index, {"metadata": header.get("__metadata__")}


def encode_group(
    file: str,
    group: list[tuple[str, dict, bytearray]],
    spool: Spool,
    level: int = DEFAULT_LEVEL,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    threads: int = 1,
    code: bool = True,
) -> dict[str, dict]:
    """Code a group of tensors ``(name, {"dtype": safetensors dtype, "shape": ...}, their bytes)`` of
    checkpoint file ``file`` into ``spool`` (``code`` False: store them all raw); their index entries."""
    tensors, codecs = {}, {}
    for name, entry, data in group:
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:  # stored raw it could not be read back
            raise InputError(
                f"tensor {name} of {file}: dtype {entry['dtype']} is not one the container stores",
                f"convert it to one of {', '.join(_TORCH_DTYPES)} first",
            )
        if not len(data):
            continue
        tensor = torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])
        if code and (codec := codec_for(name, tensor)):
            tensors[name], codecs[name] = tensor, codec
    coded = encode_many(tensors, chunk_elems, level, threads, codecs)
    index = {}
    for name, entry, data in group:
        if name in coded:
            spool.add(name, True, "U8", [len(coded[name].blob)], coded[name].blob)
            index[name] = {"file": file, "storage": "coded", **coded[name].index}
        else:
            spool.add(name, False, entry["dtype"], entry["shape"], data)
            index[name] = {"file": file, "storage": "raw", "dtype": entry["dtype"], "shape": entry["shape"],
                           "xxh3_64": checksum(data)}  # fmt: skip
    return index


@dataclass
class CodedCheckpoint:
    """A saved checkpoint's files, coded (spooled on disk, one spool per file) plus its other files."""

    spools: dict[str, Spool]  # by original file name
    index: dict[str, dict]
    files: dict[str, dict]
    side_files: dict[str, bytes]
    seconds: float

    def stored_bytes(self) -> dict[str, int]:
        """Bytes each tensor takes in its container."""
        return {name: p[4] - p[3] for spool in self.spools.values() for name, p in spool.places.items()}

    def stored(self, name: str) -> bytes:
        """The bytes tensor ``name`` is stored as in its container."""
        return self.spools[self.index[name]["file"]].read(name)

    def summary(self) -> dict:
        """:func:`summarize` of the coded tensors, with the encode throughput and the container count."""
        found = summarize(self.index, self.stored_bytes())
        return {
            **found,
            "encode_gb_per_s": found["raw_bytes"] / max(self.seconds, 1e-9) / 1e9,
            "containers": len(self.spools),
        }

    def write(self, folder: Path) -> None:
        """Write the side files and one container per original file into ``folder`` (once: the spooled
        bytes are deleted after)."""
        for name, data in self.side_files.items():
            (folder / name).write_bytes(data)
        for file, spool in self.spools.items():
            index = {name: entry for name, entry in self.index.items() if entry["file"] == file}
            spool.write(folder / container_name(file), _container_metadata(index, {file: self.files[file]}))
            spool.close()


def container_name(file: str) -> str:
    """The container of the checkpoint file ``file``: ``model.safetensors`` -> ``model.entropy.safetensors``."""
    return file.removesuffix(".safetensors") + CONTAINER_SUFFIX


def container_paths(folder: Path) -> list[Path]:
    """The containers in an artifact folder (one per file of the coded checkpoint), in name order."""
    return sorted(p for p in folder.glob(f"*{CONTAINER_SUFFIX}") if p.is_file())


def code_checkpoint(
    save: Callable[[Path], None], level: int, chunk_elems: int, threads: int, progress: Progress
) -> CodedCheckpoint:
    """Let ``save`` write a checkpoint into a temporary folder, then code each of its safetensors files
    (a sharded checkpoint: each shard into a container of its own)."""
    with tempfile.TemporaryDirectory(prefix="streamify-entropy-") as tmp:
        plain = Path(tmp)
        save(plain)
        side_files = {p.name: p.read_bytes() for p in plain.iterdir() if p.suffix != ".safetensors"}
        spools, index, files = {}, {}, {}
        started = time.perf_counter()
        for path in progress.track(sorted(plain.glob("*.safetensors")), "entropy coding"):
            spools[path.name] = Spool()
            file_index, files[path.name] = encode_file(path, level, chunk_elems, threads, spools[path.name])
            index.update(file_index)
        return CodedCheckpoint(spools, index, files, side_files, time.perf_counter() - started)


def _container_metadata(index: dict[str, dict], files: dict) -> dict[str, str]:
    """The container's ``__metadata__``: the index as JSON and its sha256."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, "tensors": index}
    text = json.dumps(meta, separators=(",", ":"))
    return {"format": "pt", _META_KEY: text, _DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}


def write_container(path: Path, stored: dict[str, torch.Tensor], index: dict[str, dict], files: dict) -> None:
    """Write a container file from its stored tensors in memory (tests, tools that rewrite one)."""
    save_file(stored, path, metadata=_container_metadata(index, files))


def read_index(path: Path) -> dict:
    """The container's JSON index, checked in full against its checksum and the stored tensors.

    Raises :class:`InputError` (exit 3) for a file that is not a container, a
    version this streamify does not read, an index whose sha256 does not match,
    a file name that is not a plain ``.safetensors`` name, or entries that do not
    match the stored tensors one for one.
    """
    return _checked_index(path, read_header(path))


def _checked_index(path: Path, header: dict) -> dict:
    """:func:`read_index` of a header already read (and checked) by ``read_header``."""
    metadata = header.get("__metadata__", {})
    raw = metadata.get(_META_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: the entropy index is not valid JSON ({type(exc).__name__})", _RECREATE) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a streamify entropy container", "re-create it with streamify quantize entropy")
    if meta.get("format_version") not in _RAW_CHECKSUM_KEY:
        raise InputError(
            f"{path}: entropy format version {meta.get('format_version')} is not one of 2-{FORMAT_VERSION} "
            "(version 1 left small tensors without a checksum)",
            "re-create the artifact with this streamify (streamify quantize entropy on the original model)",
        )
    if hashlib.sha256(raw.encode()).hexdigest() != metadata.get(_DIGEST_KEY):
        raise CorruptWeightsError(f"{path}: the entropy index does not match its sha256", _RECREATE)
    _check_index(path, meta, {k: v for k, v in header.items() if k != "__metadata__"})
    return meta


def _check_index(path: Path, meta: dict, stored: dict[str, dict]) -> None:
    files, entries = meta.get("files"), meta.get("tensors")
    if not isinstance(files, dict) or not isinstance(entries, dict):
        raise CorruptWeightsError(f"{path}: the index lacks its files or tensors", _RECREATE)
    for name, info in files.items():
        metadata = info.get("metadata") if isinstance(info, dict) else "not a mapping"
        strings = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        if metadata is not None and not strings:
            raise CorruptWeightsError(f"{path}: the index's entry for file {name!r} is malformed", _RECREATE)
        if not _plain_file_name(name):
            raise CorruptWeightsError(
                f"{path}: the index names the file {name!r}, which is not a plain .safetensors file name "
                "(a crafted container can try to write outside the output folder)",
                "do not use this artifact; re-create it from the original model",
            )
    if set(entries) != set(stored):
        extra, lost = sorted(set(stored) - set(entries)), sorted(set(entries) - set(stored))
        what = f"tensor {extra[0]} has no index entry" if extra else f"the index entry {lost[0]} has no tensor"
        raise CorruptWeightsError(f"{path}: {what}", _RECREATE)
    raw_key = _RAW_CHECKSUM_KEY[meta["format_version"]]
    for name, entry in entries.items():
        _check_entry(path, name, entry, stored[name], files, raw_key)


def _check_entry(path: Path, name: str, entry, header: dict, files: dict, raw_key: str) -> None:
    where = f"{path}: tensor {name}"
    valid = isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("storage"), str)
    if not valid or entry["file"] not in files or entry["storage"] not in ("raw", "coded"):
        raise CorruptWeightsError(f"{where}: malformed index entry", _RECREATE)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptWeightsError(f"{where}: the index gives no valid shape", _RECREATE)
    if entry["storage"] == "raw":
        checked = type(entry.get(raw_key)) is (int if raw_key == "crc32" else str)
        if (header["dtype"], header["shape"]) != (entry.get("dtype"), shape) or not checked:
            raise CorruptWeightsError(f"{where}: stored as {header['dtype']} {header['shape']}, the index says "
                                      f"raw {entry.get('dtype')} {shape}", _RECREATE)  # fmt: skip
        return
    if header["dtype"] != "U8" or len(header["shape"]) != 1:
        raise CorruptWeightsError(f"{where}: the index says coded, the stored tensor is not coded bytes", _RECREATE)
    dtype = TENSOR_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    key = checksum_key(entry.get("codec_version"))
    if dtype is None or key is None or not isinstance(entry.get("chunks"), list):
        raise CorruptWeightsError(f"{where}: coded entry without a valid dtype, codec version or chunk list", _RECREATE)
    count = 1
    for dim in shape:
        count *= dim
    values = count * (dtype.itemsize if entry.get("codec") == "zstd-bytes" else 1)
    check_chunks(f"{where}", entry["chunks"], values, header["shape"][0], key)


def _plain_file_name(name) -> bool:
    """A bare ``*.safetensors`` file name: no folder part, no traversal, not a container."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and not name.endswith(CONTAINER_SUFFIX)
        and Path(name).name == name
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
    )


class ContainerReader:
    """A container's index and tensor positions, read and checked once; tensors decoded on demand.

    Bytes are read from the file (``os.pread``) straight into the buffers that
    are checked and decoded; nothing else of the file is read or mapped.
    """

    def __init__(self, path: Path, index: dict | None = None) -> None:
        header = read_header(path)
        self.path, self.index = path, index or _checked_index(path, header)
        with open(path, "rb") as fh:
            (header_length,) = struct.unpack("<Q", fh.read(8))
        self.spans = {
            name: (8 + header_length + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items()
            if name != "__metadata__"
        }

    def decode(
        self, names: list[str] | None = None, threads: int = 1, into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors (all when ``names`` is None), checked and decoded on ``threads``; coded ones
        named in ``into`` are decoded into those tensors (see :func:`~streamify.codec.codec.decode_many`)."""
        entries = self.index["tensors"]
        wanted = names if names is not None else list(entries)
        found: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as fh:
            coded = []
            for name in wanted:
                if entries[name]["storage"] == "coded":
                    coded.append((name, entries[name], FileSpan(fh.fileno(), *self.spans[name], str(self.path))))
                else:
                    found[name] = self._read_raw(fh.fileno(), name)
            found.update(decode_many(coded, threads, into))
        return {name: found[name] for name in wanted}

    def coded_layout(self, names: list[str]) -> dict[str, tuple[list[int], torch.dtype]]:
        """Shape and dtype of each coded tensor among ``names`` (what a buffer to decode it into needs)."""
        entries = self.index["tensors"]
        return {
            n: (entries[n]["shape"], TENSOR_DTYPES[entries[n]["dtype"]])
            for n in names
            if entries[n]["storage"] == "coded"
        }

    def _read_raw(self, fd: int, name: str) -> torch.Tensor:
        """A tensor stored raw, read and checked against its checksum."""
        entry, (offset, length) = self.index["tensors"][name], self.spans[name]
        buffer = bytearray(length)
        read = pread_into(fd, buffer, offset)
        key = _RAW_CHECKSUM_KEY[self.index["format_version"]]
        if read != length or not checksum_matches(buffer, key, entry[key]):
            raise CorruptWeightsError(
                f"{self.path}: tensor {name} (stored raw): checksum mismatch, the stored bytes are corrupt", _RECREATE
            )
        dtype = _TORCH_DTYPES[entry["dtype"]]
        if not length:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def decode_tensors(
    path: Path,
    names: list[str] | None = None,
    threads: int = 1,
    index: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Decode the named tensors (all when ``names`` is None) from a container (:class:`ContainerReader`)."""
    return ContainerReader(path, index).decode(names, threads)


class CodedFolder:
    """The containers of an artifact folder read as one: their indexes checked and merged, each tensor
    decoded from the container that holds it."""

    def __init__(self, paths: list[Path]) -> None:
        self.readers = [ContainerReader(path) for path in paths]
        self.where: dict[str, ContainerReader] = {}
        files: dict[str, dict] = {}
        for reader in self.readers:
            for name in reader.index["tensors"]:
                if name in self.where:
                    raise CorruptWeightsError(
                        f"{reader.path}: tensor {name} is also in {self.where[name].path}", _RECREATE
                    )
                self.where[name] = reader
            for file, info in reader.index["files"].items():
                if file in files:
                    raise CorruptWeightsError(f"{reader.path}: file {file} is coded in two containers", _RECREATE)
                files[file] = info
        tensors = {name: entry for reader in self.readers for name, entry in reader.index["tensors"].items()}
        self.index = {"files": files, "tensors": tensors}

    def decode(
        self, names: list[str], threads: int = 1, into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors, each from its container (see :meth:`ContainerReader.decode`)."""
        found: dict[str, torch.Tensor] = {}
        for reader, mine in self._by_reader(names):
            found.update(reader.decode(mine, threads, into))
        return {name: found[name] for name in names}

    def coded_layout(self, names: list[str]) -> dict[str, tuple[list[int], torch.dtype]]:
        """Shape and dtype of each coded tensor among ``names``."""
        found = {}
        for reader, mine in self._by_reader(names):
            found.update(reader.coded_layout(mine))
        return found

    def _by_reader(self, names: list[str]) -> list[tuple[ContainerReader, list[str]]]:
        groups: dict[int, tuple[ContainerReader, list[str]]] = {}
        for name in names:
            reader = self.where[name]
            groups.setdefault(id(reader), (reader, []))[1].append(name)
        return list(groups.values())

    def summary(self) -> dict:
        """:func:`summarize` over every container (reads only their headers)."""
        stored = {}
        for reader in self.readers:
            stored.update({name: size for name, (_, size) in reader.spans.items()})
        return {**summarize(self.index["tensors"], stored), "containers": len(self.readers)}


def original_bytes(entry: dict) -> int:
    """Bytes of an index entry's tensor as the original file stores it (its shape and dtype)."""
    count = 1
    for dim in entry["shape"]:
        count *= dim
    return count * DTYPE_BYTES[entry["dtype"]]


def summarize(index: dict[str, dict], stored_bytes: dict[str, int]) -> dict:
    """Sizes and ratios overall and per tensor group (names with block numbers replaced by ``*``)."""
    groups: dict[str, list[int]] = {}
    totals = {"coded": [0, 0], "raw": [0, 0]}
    for name, entry in index.items():
        raw, stored = original_bytes(entry), stored_bytes[name]
        for bucket in (groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), [0, 0]), totals[entry["storage"]]):
            bucket[0] += raw
            bucket[1] += stored
    raw_total = totals["coded"][0] + totals["raw"][0]
    stored_total = totals["coded"][1] + totals["raw"][1]
    coded_raw, coded_stored = totals["coded"]
    return {
        "raw_bytes": raw_total,
        "stored_bytes": stored_total,
        "ratio": stored_total / raw_total if raw_total else 1.0,
        "coded_ratio": coded_stored / coded_raw if coded_raw else None,
        "coded_tensors": sum(e["storage"] == "coded" for e in index.values()),
        "raw_tensors": sum(e["storage"] == "raw" for e in index.values()),
        "groups": {
            g: {"raw_bytes": r, "stored_bytes": s, "ratio": s / r if r else 1.0} for g, (r, s) in sorted(groups.items())
        },
    }
