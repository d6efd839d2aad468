"""Small helpers on the safetensors file format: header checks and metadata stamping.

A safetensors file is an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, data_offsets; optional ``__metadata__`` of
string -> string), then the tensor bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from streamify.errors import InputError

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict:
    """Read and check a safetensors header; raise :class:`InputError` if the file is broken.

    Checks that the header parses and that the file holds every byte the header
    points to, so a truncated download is caught before loading.
    """
    size = path.stat().st_size
    hint = "re-download or re-create the file; it is truncated or not a safetensors file"
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(size - 8, _MAX_HEADER):
                raise InputError(f"{path}: header length {length} exceeds the file size {size}", hint)
            header = json.loads(fh.read(length))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable safetensors header ({exc})", hint) from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise InputError(f"{path}: file is {size} bytes but its header needs {8 + length + end}", hint)
    return header


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
