"""Sizes as people read them."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def human_bytes(n: int | float | None) -> str:
    """``n`` bytes in B, KiB, MiB or GiB (one decimal); ``?`` for None."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def shard_bytes(size: str) -> int:
    """Bytes in a shard size as transformers reads it (``5GB``, ``500MB``, ``2GiB``); ``ValueError`` else."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(size)
    except ValueError as exc:
        raise ValueError(f"{size!r} is not a size transformers reads (e.g. 5GB, 500MB, 2GiB)") from exc


def _checked_shard_size(size: str) -> str:
    shard_bytes(size)
    return size


ShardSize = Annotated[str, AfterValidator(_checked_shard_size)]  # a params field checked as transformers reads it
