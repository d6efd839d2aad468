"""Errors with documented exit codes.

Every error a user can cause is a :class:`StreamifyError` subclass carrying the
exit code the CLI returns, a message naming the input and the problem, and a
hint saying what to do.
"""

from __future__ import annotations

import errno
import re
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes (documented in README.md)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    INPUT = 3
    RESOURCES = 4
    GATE = 5
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class StreamifyError(Exception):
    """Base class: a message, a hint on what to do, and the exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class UsageError(StreamifyError):
    """Bad command-line usage, recipe or override (exit 2)."""

    exit_code = ExitCode.USAGE


class InputError(StreamifyError):
    """Input checkpoint unreadable or unsupported (exit 3)."""

    exit_code = ExitCode.INPUT


class ResourceError(StreamifyError):
    """Out of memory, or the job would not fit (exit 4)."""

    exit_code = ExitCode.RESOURCES


class GateError(StreamifyError):
    """A quality gate failed (exit 5); ``result`` is the run's summary (eval and every gate), written anyway."""

    exit_code = ExitCode.GATE

    def __init__(self, message: str, hint: str | None = None, result: dict | None = None) -> None:
        super().__init__(message, hint)
        self.result = result


class Interrupted(StreamifyError):
    """Stopped by Ctrl-C where what was done so far is kept (exit 130, as shells report SIGINT)."""

    exit_code = ExitCode.INTERRUPTED


_WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, over quota, over the file-size limit


def write_refused(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (followed as tracebacks show it) that is the file system refusing a
    write: an OSError, or the ``(os error N)`` that libraries written in Rust (safetensors) put in their own
    errors; None when there is none."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        found = re.search(r"\(os error (\d+)\)", str(current))
        if code in _WRITE_REFUSED or (found and int(found.group(1)) in _WRITE_REFUSED):
            return current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None
