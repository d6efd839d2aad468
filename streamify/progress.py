"""Progress reporting that library code can use without knowing about the terminal.

Library functions take a :class:`Progress` and call ``progress.track(...)``; the
CLI passes a rich-backed one when stdout is a terminal, tests and quiet runs the
silent default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """Silent progress: iterates and says nothing. Subclassed by the CLI for rich bars."""

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Yield ``items``, showing progress under ``description``."""
        yield from items

    def log(self, message: str) -> None:
        """A one-line message for the user (stderr in the CLI)."""


SILENT = Progress()
