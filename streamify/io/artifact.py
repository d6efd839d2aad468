"""Write an artifact folder safely: checked output, a lock for the run, a temporary sibling renamed at the end.

Safety rules (each one a user's data at stake):

- the output is never the input, inside it, or a folder that contains it;
- ``--overwrite`` replaces only a streamify artifact (a folder with ``streamify.json``),
  never an arbitrary folder of the user's;
- one run at a time writes an output (a lock next to it names the holder's PID),
  and the final rename re-checks what is at the output then;
- temporary siblings of killed runs are removed by the next run on that output
  and by ``streamify cache clean``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamify import __version__
from streamify.arch import arch_for
from streamify.errors import UsageError
from streamify.io.atomic import TMP_TAG, pid_alive, remove_stale_siblings, temp_sibling
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.io.manifest import MANIFEST_NAME
from streamify.io.safetensors_file import stamp_metadata
from streamify.io.source import sha256_file

WEIGHT_GLOBS = ("*.safetensors", "*.gguf")
FILES_KEY = "files"  # the manifest's record of every file it covers: name -> {sha256, bytes}
_OVERWRITE_HINT = "choose another output folder, or remove this one yourself if you mean to replace it"
_WRITABLE = "choose a writable output folder on a real file system"


def check_output(output: str | None, source_folder: Path | None, overwrite: bool) -> Path:
    """Check an output folder before any work; returns its absolute path.

    Refused (exit 2): no output; the input, a folder inside it or one that
    contains it (with or without ``overwrite``); a file; a non-empty folder
    without ``overwrite``, or with it when the folder is not a streamify
    artifact; an unwritable place.
    """
    if not output:
        raise UsageError("no output folder given", "pass -o OUT (or output=OUT after a recipe)")
    out = Path(output).expanduser().resolve()
    if source_folder is not None:
        src = source_folder.resolve()
        if out == src or src in out.parents:
            raise UsageError(
                f"{out}: output is inside the input folder {src} (or is that folder); streamify never writes there",
                "choose an output folder outside the input",
            )
        if out in src.parents:
            raise UsageError(
                f"{out}: output folder contains the input {src}; replacing it would delete the input",
                "choose an output folder outside the input's folders",
            )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder", "choose another output path")
    _check_replaceable(out, overwrite)
    if not os.access(_existing_parent(out), os.W_OK):
        raise UsageError(f"{out}: cannot write there (no permission)", "choose a writable output folder")
    return out


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` and it is a streamify artifact; refuse anything not a folder."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: exists and is not a folder (or is a link)", "choose another output path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out}: output folder exists and is not empty", "pass --overwrite, or choose another folder")
    manifest = out / MANIFEST_NAME
    if manifest.is_symlink() or not manifest.is_file():
        raise UsageError(
            f"{out}: --overwrite replaces only a streamify artifact (a folder with {MANIFEST_NAME}); "
            "this folder holds other files",
            _OVERWRITE_HINT,
        )


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@contextmanager
def output_lock(
    out: Path, what: str = "output", hint: str = "wait for it to finish, or choose another output folder"
) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for a run; a second run fails at once (exit 2) naming the first's PID,
    ``what`` it is writing and the ``hint``."""
    lock = out.with_name(f".{out.name}.streamify-lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a planted link is refused
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UsageError(f"{lock}: not a regular file", "remove it; streamify keeps its lock there")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"{out}: another streamify run (PID {holder}) is writing this {what}", hint) from None
            try:
                same = os.fstat(fd).st_ino == os.lstat(lock).st_ino
            except FileNotFoundError:  # the holder before us removed it: lock the new file
                same = False
            if same:
                break
            os.close(fd)
    except OSError as exc:
        what = "its lock file is a link" if exc.errno == errno.ELOOP else exc.strerror
        raise UsageError(f"{out}: cannot create the output folder there ({what})", _WRITABLE) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    remove_stale_siblings(out.parent, out.name)  # left by killed runs on this output
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it is removed.

    At the end, what is at ``out`` is checked again (a folder made there during
    the run is never deleted without ``overwrite``, and never when it is not an
    artifact). Use it under :func:`output_lock`.
    """
    try:
        tmp = temp_sibling(out)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the output folder there ({exc.strerror})", _WRITABLE) from exc
    pending = _register_pending(tmp)
    try:
        yield tmp
        _check_replaceable(out, overwrite)
        old = tmp.with_name(tmp.name.replace(TMP_TAG, ".streamify-old-"))
        if out.exists():
            out.replace(old)
        try:
            tmp.replace(out)
        except OSError:
            if old.exists() and not out.exists():  # put the previous artifact back
                old.replace(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if pending is not None:
            pending.unlink(missing_ok=True)


def pending_folder() -> Path:
    """Where runs record their temporary output folders, so ``streamify cache clean`` finds those of killed runs."""
    return cache_root() / "pending"


def clean_pending() -> int:
    """Remove the temporary output folders of runs that were killed; returns the bytes freed."""
    freed = 0
    folder = pending_folder()
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(record.read_text())
            tmp, pid = Path(entry["path"]), int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if pid_alive(pid):
            continue
        freed += remove_stale_siblings(tmp.parent, tmp.name.split(TMP_TAG)[0].removeprefix("."))
        record.unlink(missing_ok=True)
    return freed


def _register_pending(tmp: Path) -> Path | None:
    record = pending_folder() / f"{hashlib.sha256(str(tmp).encode()).hexdigest()[:24]}.json"
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"pid": os.getpid(), "path": str(tmp)}))
    except OSError:  # a cache that cannot be written costs only this bookkeeping
        return None
    return record


def save_model_files(checkpoint: Checkpoint, folder: Path) -> None:
    """Write config, weights, tokenizer and feature extractor: as transformers does, or in the format a stage chose.

    A GGUF file carries its own tokenizer: no tokenizer files are written beside it (transformers would mix
    them with the GGUF's when loading, and tokenize differently from the source).
    """
    if checkpoint.weights_writer is not None:
        checkpoint.weights_writer(folder)
    else:
        checkpoint.model.save_pretrained(folder, max_shard_size="2GB")
    _published_layer_types(folder / "config.json")
    if any(folder.glob("*.gguf")):
        return
    for files in (checkpoint.tokenizer, checkpoint.processor):
        if files is not None:
            files.save_pretrained(folder)


def _published_layer_types(config_file: Path) -> None:
    """Rename ``layer_types`` entries in a saved config.json to the names its family's published checkpoints use
    (:attr:`streamify.arch.Arch.saved_layer_types`), so runtimes that read those read this one."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    arch = arch_for(config.get("model_type"))
    names = arch.saved_layer_types if arch is not None else None
    if names and isinstance(config.get("layer_types"), list):
        config["layer_types"] = [names.get(kind, kind) for kind in config["layer_types"]]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def weight_files(folder: Path) -> list[Path]:
    """Weight files in a folder (safetensors or GGUF), sorted."""
    return sorted(p for pattern in WEIGHT_GLOBS for p in folder.glob(pattern))


def weights_size(folder: Path) -> int:
    """Bytes of a folder's weight files."""
    return sum(p.stat().st_size for p in weight_files(folder))


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest as written, without its ``files`` record (which hashes files carrying this digest)."""
    core = {k: v for k, v in manifest.items() if k != FILES_KEY}
    return hashlib.sha256(_encode(core)).hexdigest()


def _encode(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode()


def write_manifest(folder: Path, manifest: dict) -> str:
    """Write ``streamify.json``: stamp its digest into every safetensors file, then record every file's sha256.

    Call it once the folder holds everything but the model card (which is made
    from the manifest). Returns the digest (:func:`manifest_digest`).
    """
    manifest = json.loads(_encode(manifest))  # what a reader will see: strings where default=str applied
    digest = manifest_digest(manifest)
    for path in sorted(folder.glob("*.safetensors")):
        stamp_metadata(path, {"streamify_version": __version__, "streamify_manifest_sha256": digest})
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    manifest[FILES_KEY] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    (folder / MANIFEST_NAME).write_bytes(_encode(manifest))
    return digest
