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
