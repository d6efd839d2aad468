"""The container of entropy-coded weights: ``model.entropy.safetensors``.

Format (version 1), so that another implementation can read it:

- A safetensors file. Every tensor of the checkpoint is stored under its own
  name, either *coded* (a 1-D ``U8`` tensor: the concatenated chunks written by
  :mod:`streamify.quantize.entropy_codec`) or *raw* (the tensor itself, in its
  own dtype: tensors under 4096 values, and integer and bool tensors other than
  INT4 codes packed in INT32 ``*weight_packed`` tensors).
- ``__metadata__["streamify_entropy"]`` is a JSON string::

    {"format": "streamify.entropy", "format_version": 1,
     "files": {"model.safetensors": {"metadata": {...}}},   # the original files and their __metadata__
     "tensors": {NAME: {"file": "model.safetensors", "storage": "coded" | "raw",
                        # coded only:
                        "codec": "pcodec-rotl1" | "zstd-bytes", "codec_version": 1,
                        "dtype": "BF16" | "F16" | "F32" (rotl1) | "I32" (bytes), "shape": [...],
                        "chunks": [{"start": first value, "count": values,
                                    "offset": byte offset in the U8 tensor, "length": bytes,
                                    "crc32": CRC-32 (zlib) of those bytes}, ...]}}}

- Values: ``pcodec-rotl1`` codes one value per element (unsigned integers of the
  dtype's width); ``zstd-bytes`` codes the tensor's little-endian bytes, each
  chunk one zstd frame; ``start`` and ``count`` are then in bytes.
- Decoding a chunk: check its CRC-32; for ``pcodec-rotl1`` pcodec-decompress it
  (``simple_decompress``) into ``count`` unsigned integers, rotate each right by
  one bit and reinterpret the bits as the dtype; for ``zstd-bytes``
  zstd-decompress it into ``count`` bytes of the tensor. Restoring a file writes
  its tensors, in name order, with its original ``__metadata__``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamify.errors import InputError
from streamify.io.safetensors_file import read_header
from streamify.progress import Progress
from streamify.quantize.entropy_codec import TENSOR_DTYPES, codec_for, decode_many, encode_many

CONTAINER_NAME = "model.entropy.safetensors"
FORMAT = "streamify.entropy"
FORMAT_VERSION = 1
_META_KEY = "streamify_entropy"


def encode_file(path: Path, level: int, chunk_elems: int, threads: int) -> tuple[dict, dict, dict]:
    """Code every tensor of one safetensors file.

    Returns ``(stored tensors by name, index entries by name, the file's entry: its __metadata__)``.
    """
    with safe_open(path, "pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a mapping)
        file_entry = {"metadata": fh.metadata()}
    codecs = {name: codec for name, tensor in tensors.items() if (codec := codec_for(name, tensor))}
    coded = encode_many({name: tensors[name] for name in codecs}, chunk_elems, level, threads, codecs)
    stored: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, tensor in tensors.items():
        if name in coded:
            stored[name] = torch.frombuffer(bytearray(coded[name].blob), dtype=torch.uint8)
            index[name] = {"file": path.name, "storage": "coded", **coded[name].index}
        else:
            stored[name] = tensor
            index[name] = {"file": path.name, "storage": "raw"}
    return stored, index, file_entry


@dataclass
class CodedCheckpoint:
    """A saved checkpoint's files, coded: the container's contents plus the other files (config, ...)."""

    stored: dict[str, torch.Tensor]
    index: dict[str, dict]
    files: dict[str, dict]
    side_files: dict[str, bytes]
    seconds: float

    def stored_bytes(self) -> dict[str, int]:
        """Bytes each tensor takes in the container."""
        return {name: t.numel() * t.element_size() for name, t in self.stored.items()}

    def summary(self) -> dict:
        """:func:`summarize` of the coded tensors, with the encode throughput."""
        found = summarize(self.index, self.stored_bytes())
        return {**found, "encode_gb_per_s": found["raw_bytes"] / max(self.seconds, 1e-9) / 1e9}

    def write(self, folder: Path) -> None:
        """Write the side files and the container into ``folder``."""
        for name, data in self.side_files.items():
            (folder / name).write_bytes(data)
        write_container(folder / CONTAINER_NAME, self.stored, self.index, self.files)


def code_checkpoint(
    save: Callable[[Path], None], level: int, chunk_elems: int, threads: int, progress: Progress
) -> CodedCheckpoint:
    """Let ``save`` write a checkpoint into a temporary folder, then code every safetensors file of it."""
    with tempfile.TemporaryDirectory(prefix="streamify-entropy-") as tmp:
        plain = Path(tmp)
        save(plain)
        side_files = {p.name: p.read_bytes() for p in plain.iterdir() if p.suffix != ".safetensors"}
        stored, index, files = {}, {}, {}
        started = time.perf_counter()
        for path in progress.track(sorted(plain.glob("*.safetensors")), "entropy coding"):
            file_stored, file_index, files[path.name] = encode_file(path, level, chunk_elems, threads)
            stored.update(file_stored)
            index.update(file_index)
        return CodedCheckpoint(stored, index, files, side_files, time.perf_counter() - started)


def write_container(path: Path, stored: dict[str, torch.Tensor], index: dict[str, dict], files: dict) -> None:
    """Write the container file."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, "tensors": index}
    save_file(stored, path, metadata={"format": "pt", _META_KEY: json.dumps(meta, separators=(",", ":"))})


def read_index(path: Path) -> dict:
    """The container's JSON index (checked for format and version; a truncated file is an error)."""
    raw = read_header(path).get("__metadata__", {}).get(_META_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: the entropy index is not valid JSON ({exc})", "re-create the artifact") from exc
    if not meta or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a streamify entropy container", "re-create it with streamify quantize entropy")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: entropy format version {meta.get('format_version')} is not {FORMAT_VERSION}", "upgrade streamify"
        )
    return meta


def decode_tensors(
    path: Path,
    names: list[str] | None = None,
    threads: int = 1,
    index: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Decode the named tensors (all when ``names`` is None) from a container."""
    meta = index or read_index(path)
    entries = meta["tensors"]
    wanted = names if names is not None else list(entries)
    with safe_open(path, "pt") as fh:
        stored = {name: fh.get_tensor(name) for name in wanted}
    coded = [(n, entries[n], stored[n].numpy()) for n in wanted if entries[n]["storage"] == "coded"]
    decoded = decode_many(coded, threads)
    return {n: decoded[n] if n in decoded else stored[n] for n in wanted}


def restore_files(path: Path, folder: Path, threads: int = 1) -> list[Path]:
    """Write the original safetensors files, bit-identical tensors and original metadata, into ``folder``."""
    meta = read_index(path)
    written = []
    for file_name, info in meta["files"].items():
        names = sorted(n for n, e in meta["tensors"].items() if e["file"] == file_name)
        tensors = decode_tensors(path, names, threads, meta)
        target = folder / file_name
        save_file(tensors, target, metadata=info.get("metadata") or None)
        written.append(target)
    return written


def restore_folder(folder: Path, target: Path, threads: int = 1, skip: frozenset[str] = frozenset()) -> list[Path]:
    """Copy an artifact folder's other files into ``target`` and restore its safetensors files there."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CONTAINER_NAME and path.name not in skip:
            shutil.copy2(path, target / path.name)
    return restore_files(folder / CONTAINER_NAME, target, threads)


def _raw_bytes(entry: dict, stored_bytes: int) -> int:
    if entry["storage"] == "raw":
        return stored_bytes
    count = 1
    for dim in entry["shape"]:
        count *= dim
    return count * TENSOR_DTYPES[entry["dtype"]].itemsize


def summarize(index: dict[str, dict], stored_bytes: dict[str, int]) -> dict:
    """Sizes and ratios overall and per tensor group (names with block numbers replaced by ``*``)."""
    groups: dict[str, list[int]] = {}
    totals = {"coded": [0, 0], "raw": [0, 0]}
    for name, entry in index.items():
        raw, stored = _raw_bytes(entry, stored_bytes[name]), stored_bytes[name]
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


def summarize_file(path: Path) -> dict:
    """:func:`summarize` for a container on disk (reads only its header)."""
    header = read_header(path)
    stored = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return summarize(read_index(path)["tensors"], stored)
