"""Folders that appear whole or not at all, safe when several processes write the same one.

A writer fills a temporary sibling named ``.NAME.streamify-tmp-PID-RANDOM`` and
renames it into place. When another process published the same folder first,
the later writer drops its copy and takes the winner's (cache entries are keyed
by content, so both hold the same thing). Temporary siblings whose process is
gone are stale: :func:`remove_stale_siblings` clears them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_TAG = ".streamify-tmp-"
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.streamify-(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's process, or not a PID: leave it be
        return True
    return True


def temp_sibling(final: Path) -> Path:
    """Create and return a fresh, empty temporary folder next to ``final`` (unique to this call)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_TAG}{os.getpid()}-", dir=final.parent))


def publish(tmp: Path, final: Path, complete=lambda folder: folder.is_dir()) -> bool:
    """Rename ``tmp`` to ``final``. When another writer got there first, drop ``tmp`` and keep theirs.

    ``complete`` says whether a folder found at ``final`` is a whole entry; an
    incomplete one (left by an older version or a crash) is replaced. Returns
    True when ``tmp`` was published.
    """
    for _ in range(3):
        if final.is_dir() and complete(final):  # another writer won: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        try:
            tmp.replace(final)  # atomic; fails while a non-empty folder is there
            return True
        except OSError:
            if final.is_dir() and not complete(final):  # a leftover: move it aside in one rename, then drop it
                aside = temp_sibling(final)
                aside.rmdir()
                try:
                    final.replace(aside)
                except OSError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
            elif not final.is_dir() and final.exists():
                raise
    if final.is_dir() and complete(final):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    raise OSError(f"{final}: could not be published (something keeps replacing it)")


def stale_siblings(folder: Path, name: str | None = None) -> list[Path]:
    """Temporary folders in ``folder`` (for the final name ``name``, or any) whose writing process is gone."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _TMP_NAME.match(path.name)
        if match and (name is None or match["name"] == name) and not pid_alive(int(match["pid"])):
            found.append(path)
    return sorted(found)


def remove_stale_siblings(folder: Path, name: str | None = None) -> int:
    """Remove :func:`stale_siblings`; returns the bytes freed."""
    freed = 0
    for path in stale_siblings(folder, name):
        freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(path, ignore_errors=True)
    return freed


@contextmanager
def file_written(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write the file into; renamed to ``path`` when the block ends and
    removed when it fails, so ``path`` is never a half file, even with two writers or a second Ctrl-C."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj, path: Path) -> None:
    """``torch.save(obj)`` into ``path`` (:func:`file_written`). It writes through a Python file object, so a
    full disk raises the OSError, with its errno, that torch's own file writer turns into a RuntimeError
    without one."""
    import torch

    with file_written(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
