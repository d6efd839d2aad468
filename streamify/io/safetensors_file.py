"""Small helpers on the safetensors file format: header checks and metadata stamping.

A safetensors file is an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, data_offsets; optional ``__metadata__`` of
string -> string), then the tensor bytes.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

from streamify.errors import InputError, UsageError

_MAX_HEADER = 100 * 1024 * 1024
Layout = list[tuple[str, str, list[int], int]]  # (name, dtype, shape, bytes) of each tensor, in file order
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


_MOST_PER_READ = 1 << 30  # Linux returns at most ~2 GiB from one read; larger reads are split
_FINITE_PIECE = 1 << 24  # values checked for NaN or infinity at a time


def pread_into(fd: int, buffer, offset: int) -> int:
    """Fill ``buffer`` from ``fd`` at ``offset``, in as many reads as it takes; the bytes read (fewer only
    at the end of the file)."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _MOST_PER_READ]], offset + done)
        if got == 0:
            break
        done += got
    return done


INDEX_NAME = "model.safetensors.index.json"  # transformers' index of a sharded checkpoint


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards as transformers writes them: ``model.safetensors`` for one, else
    ``model-00001-of-0000n.safetensors`` and so on."""
    return ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in
                                                     range(1, count + 1)]  # fmt: skip


def shard_index(weight_map: dict[str, str], total_size: int) -> str:
    """The text of :data:`INDEX_NAME`: the shards' total tensor bytes and the shard of each tensor."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      indent=2) + "\n"  # fmt: skip


def aligned_order(layout: Layout) -> Layout:
    """``layout`` in the order safetensors' own writer uses: largest element size first, then by name,
    so that every tensor starts aligned to its element size."""
    return sorted(layout, key=lambda item: (-DTYPE_BYTES[item[1]], item[0]))


def write_streamed(path: Path, layout: Layout, metadata: dict[str, str] | None, data: Iterable) -> None:
    """Write a safetensors file tensor by tensor: the header from ``layout``, then each buffer ``data``
    yields (one per tensor, in ``layout``'s order), so no more than one tensor is ever in memory."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, size in layout:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    if len(text) > _MAX_HEADER:
        raise UsageError(
            f"{path}: the header would be {len(text):,} bytes, over safetensors' limit of {_MAX_HEADER:,}",
            "write smaller shards (--max-shard-size) or larger chunks (--chunk-elems)",
        )
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for (name, _, _, size), buffer in zip(layout, data, strict=True):
            if memoryview(buffer).nbytes != size:
                raise ValueError(f"{path}: tensor {name} is {memoryview(buffer).nbytes} bytes, not {size}")
            out.write(buffer)


def read_header(path: Path) -> dict:
    """Read and check a safetensors header; raise :class:`InputError` if the file is broken.

    Checks that the header parses, that every entry is consistent (a known
    dtype, a shape of non-negative integers, byte offsets that fit its shape and
    do not overlap another tensor's), and that the file holds every byte the
    header points to, so a truncated download is caught before loading.
    """
    size = path.stat().st_size
    hint = "re-download or re-create the file; it is truncated or not a safetensors file"
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(size - 8, _MAX_HEADER):
                raise InputError(f"{path}: header length {length} exceeds the file size {size}", hint)
            header = json.loads(fh.read(length))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: unreadable safetensors header ({exc})", hint) from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object", hint)
    spans = sorted(_check_entry(path, name, entry) for name, entry in header.items() if name != "__metadata__")
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise InputError(f"{path}: tensors '{name}' and '{other}' overlap in the file", _DAMAGED)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: the header's __metadata__ must map strings to strings", _DAMAGED)
    end = max((span[1] for span in spans), default=0)
    if 8 + length + end > size:
        raise InputError(f"{path}: file is {size} bytes but its header needs {8 + length + end}", hint)
    return header


_DAMAGED = "the file's header is damaged: re-download or re-create the file"


def _check_entry(path: Path, name: str, entry) -> tuple[int, int, str]:
    """Check one header entry; returns ``(start, end, name)`` of its bytes."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise InputError(f"{where}: the header entry needs dtype, shape and data_offsets", _DAMAGED)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise InputError(f"{where}: unknown dtype {dtype!r}", _DAMAGED)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers", _DAMAGED)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InputError(f"{where}: data_offsets {offsets!r} are not two non-negative integers", _DAMAGED)
    count = 1
    for dim in shape:
        count *= dim
    start, end = offsets
    if end - start != count * DTYPE_BYTES[dtype]:
        raise InputError(
            f"{where}: shape {shape} of {dtype} needs {count * DTYPE_BYTES[dtype]} bytes, "
            f"data_offsets give {end - start}",
            _DAMAGED,
        )
    return start, end, name


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def stamp_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add string entries to a safetensors file's ``__metadata__`` (rewrites the header in place)."""
    header = read_header(path)
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header.setdefault("__metadata__", {}).update({k: str(v) for k, v in extra.items()})
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
        tmp = path.with_name(path.name + ".stamping")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            fh.seek(8 + length)
            shutil.copyfileobj(fh, out, 1 << 24)
    tmp.replace(path)


def save_file_whole(tensors: dict, path: Path) -> None:
    """Write ``tensors`` to the .safetensors ``path`` through a temporary sibling of this process, renamed into
    place (several processes may write the same file); the temporary file is removed when writing fails."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def read_named_tensor(path: Path, name: str, hint: str, optional: bool = False):
    """The float tensor ``name`` of the .safetensors file ``path`` (None when it has none and it is
    ``optional``), as fp32; InputError naming the file when it cannot be read, is not floating point or holds
    NaN or infinite values."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            if optional and name not in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                return None
            tensor = handle.get_tensor(name)
    except (SafetensorError, OSError, KeyError) as exc:
        raise InputError(f"{path}: cannot read a '{name}' tensor ({exc})", hint) from exc
    if not tensor.is_floating_point():
        raise InputError(f"{path}: '{name}' holds {str(tensor.dtype).removeprefix('torch.')} values, not floats", hint)
    flat, bad, first = tensor.reshape(-1), 0, None
    for start in range(0, flat.numel(), _FINITE_PIECE):  # in pieces: no mask as large as the tensor
        wrong = ~flat[start : start + _FINITE_PIECE].isfinite()
        if wrong.any():
            bad += int(wrong.sum())
            first = first if first is not None else start + int(wrong.nonzero()[0])
    if bad:
        index = [int(i) for i in torch.unravel_index(torch.tensor(first), tensor.shape)]
        raise InputError(f"{path}: '{name}' holds {bad} NaN or infinite values (the first at index {index})", hint)
    return tensor.float()
