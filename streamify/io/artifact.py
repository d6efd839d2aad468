"""Write an artifact folder atomically: a temporary sibling folder renamed into place at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamify import __version__
from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.io.load import MANIFEST_NAME
from streamify.io.safetensors_file import stamp_metadata

WEIGHT_GLOBS = ("*.safetensors", "*.gguf")


def check_output(output: str | None, source_folder: Path | None, overwrite: bool) -> Path:
    """Check an output folder before any work: set, not the input, empty unless ``overwrite``."""
    if not output:
        raise UsageError("no output folder given", "pass -o OUT (or output=OUT after a recipe)")
    out = Path(output).expanduser().resolve()
    if source_folder is not None:
        src = source_folder.resolve()
        if out == src or src in out.parents:
            raise UsageError(
                f"{out}: output is inside the input folder {src}; streamify never writes there",
                "choose an output folder outside the input",
            )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder", "choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: output folder exists and is not empty", "pass --overwrite, or choose another folder")
    if not os.access(_existing_parent(out), os.W_OK):
        raise UsageError(f"{out}: cannot write there (no permission)", "choose a writable output folder")
    return out


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.streamify-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.streamify-old-{os.getpid()}")
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def save_model_files(checkpoint: Checkpoint, folder: Path) -> None:
    """Write config, weights and tokenizer: as transformers does, or in the format a stage chose."""
    if checkpoint.weights_writer is not None:
        checkpoint.weights_writer(folder)
    else:
        checkpoint.model.save_pretrained(folder, max_shard_size="2GB")
    if checkpoint.tokenizer is not None:
        checkpoint.tokenizer.save_pretrained(folder)


def weight_files(folder: Path) -> list[Path]:
    """Weight files in a folder (safetensors or GGUF), sorted."""
    return sorted(p for pattern in WEIGHT_GLOBS for p in folder.glob(pattern))


def weights_size(folder: Path) -> int:
    """Bytes of a folder's weight files."""
    return sum(p.stat().st_size for p in weight_files(folder))


def write_manifest(folder: Path, manifest: dict) -> str:
    """Write ``streamify.json`` and stamp its sha256 and the streamify version into every safetensors file.

    Returns the manifest's sha256.
    """
    encoded = (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode()
    digest = hashlib.sha256(encoded).hexdigest()
    for path in sorted(folder.glob("*.safetensors")):
        stamp_metadata(path, {"streamify_version": __version__, "streamify_manifest_sha256": digest})
    (folder / MANIFEST_NAME).write_bytes(encoded)
    return digest
