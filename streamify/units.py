"""Sizes as people read them."""

from __future__ import annotations


def human_bytes(n: int | float | None) -> str:
    """``n`` bytes in B, KiB, MiB or GiB (one decimal); ``?`` for None."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def checked_shard_size(size: str) -> str:
    """``size`` if transformers reads it as a shard size (``5GB``, ``500MB``, ``2GiB``), else ``ValueError``."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(size)
    except ValueError as exc:
        raise ValueError(f"{size!r} is not a size transformers reads (e.g. 5GB, 500MB, 2GiB)") from exc
    return size
