"""How commands talk: JSON summaries on stdout, logs and errors on stderr, rich progress on a terminal."""

from __future__ import annotations

import enum
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar

from streamify.errors import ExitCode, GateError, Interrupted, ResourceError, StreamifyError, write_refused
from streamify.progress import Progress

T = TypeVar("T")


def _clock(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Format(enum.StrEnum):
    """Output format of every command."""

    human = "human"
    json = "json"
    quiet = "quiet"


class Reporter(Progress):
    """Progress and logs for one command, shaped by ``--format``."""

    def __init__(self, fmt: Format) -> None:
        self.format = fmt
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Console(highlight=False)
        self.bars = fmt == Format.human and sys.stdout.isatty()

    def log(self, message: str) -> None:
        """A log line on stderr (not in quiet mode)."""
        if self.format != Format.quiet:
            self.err.print(f"[dim]streamify:[/dim] {message}")

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a rich progress bar when stdout is a terminal and the format is human.

        Otherwise (a log file, CI) a line on stderr after each item, or after each
        twentieth of a long loop, with the time so far and an estimate of the rest.
        """
        if not self.bars:
            yield from self._lines(items, description, total)
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with RichBar(*columns, console=self.err, transient=True) as bar:
            yield from bar.track(items, total=total, description=description)

    def _lines(self, items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        if self.format == Format.quiet or not total:
            yield from items
            return
        every = max(1, total // 20)
        started = time.monotonic()
        for done, item in enumerate(items, start=1):
            yield item
            if done % every == 0 or done == total:
                elapsed = time.monotonic() - started
                left = elapsed / done * (total - done)
                self.log(f"{description}: {done}/{total}, {_clock(elapsed)} elapsed, about {_clock(left)} left")

    def result(self, data: dict, render: Callable[[Console, dict], None]) -> None:
        """The command's result: JSON on stdout, a human rendering, or nothing when quiet."""
        if self.format == Format.json:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        elif self.format == Format.human:
            render(self.out, data)

    def run(self, work: Callable[[], dict], render: Callable[[Console, dict], None]) -> None:
        """Show the result of ``work()``; when a gate fails, the eval and every gate are shown before the error."""
        try:
            data = work()
        except GateError as exc:
            if self.format == Format.human and exc.result is not None:
                render(self.out, exc.result)
            raise
        self.result(data, render)

    def error(self, exc: StreamifyError) -> None:
        """Report an error: always on stderr, and as JSON on stdout in json mode."""
        self.err.print(f"[bold red]error:[/bold red] {escape(exc.message)}", markup=True, highlight=False)
        if exc.hint:  # escaped: a message may hold brackets, such as a tensor's shape
            self.err.print(f"  [bold]fix:[/bold] {escape(exc.hint)}")
        if self.format == Format.json:
            payload = {"ok": False, "exit_code": int(exc.exit_code), "error": exc.message, "hint": exc.hint}
            if getattr(exc, "result", None) is not None:  # a failed gate: the run's results still count
                payload["result"] = exc.result
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@contextmanager
def command(fmt: Format) -> Iterator[Reporter]:
    """Run a command body: quiet third-party logs, map errors to documented exit codes."""
    import transformers

    # our runtime passes past_key_values, the name every transformers 5 release accepts; 5.24 warns about it
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated", category=FutureWarning)
    # accelerate's prepare_model reads is_gradient_checkpointing, which transformers 5.24 deprecates
    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    reporter = Reporter(fmt)
    try:
        yield reporter
    except StreamifyError as exc:
        reporter.error(exc)
        raise typer.Exit(int(exc.exit_code)) from None
    except KeyboardInterrupt:  # not click's "Aborted!" with exit 1, which the README keeps for bugs
        reporter.error(
            Interrupted(
                "interrupted (Ctrl-C)",
                "run again: outputs are written under a temporary name until they are whole, and training and "
                "block-wise stages resume from their last checkpoint",
            )
        )
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except Exception as exc:
        import torch

        refused = write_refused(exc)
        if refused is not None:
            reporter.error(
                ResourceError(
                    f"a file could not be written: {refused}",
                    "free disk space where the output goes and in streamify's cache ($STREAMIFY_CACHE_DIR, "
                    "`streamify cache` shows it), or raise the file-size limit",
                )
            )
            raise typer.Exit(int(ExitCode.RESOURCES)) from None
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):  # the latter is a RuntimeError
            reporter.error(ResourceError(f"out of memory: {exc}", "use --dtype bf16, a smaller job or more memory"))
            raise typer.Exit(int(ExitCode.RESOURCES)) from None
        _internal(reporter)


def _internal(reporter: Reporter) -> None:
    traceback.print_exc()
    reporter.error(StreamifyError("internal error (a bug in streamify)", "please report it with the traceback above"))
    raise typer.Exit(int(ExitCode.INTERNAL)) from None
