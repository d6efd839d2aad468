"""The stage cache: each stage's output kept under a content key, so a re-run resumes where it stopped.

The key of stage *i* is the sha256 of the key of its input (for the first
stage: the source's content fingerprint and the load dtype), the stage's name
and resolved params, the data's fingerprint, the seed, the device type and the
streamify version. Contents, never names: the same path with new weights gets
new keys. An entry is a folder ``<cache>/stages/<key>/`` holding the checkpoint
as transformers writes it plus ``stage.json`` (the stage records up to it, the
streaming record and the input's history). It is written to a temporary
sibling and renamed, so a killed run never leaves a half entry. Stages that fix
the weight format (``final``) are not cached: they are the cheap last step.

Training inside a stage (healing) checkpoints itself under ``<cache>/train/``
(see :mod:`streamify.distill.trainer`), INT4 calibration under
``<cache>/calibrate/`` (see :mod:`streamify.quantize.int4.calibrate`); the GGUF
dequantization cache lives under ``<cache>/gguf/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from streamify import __version__
from streamify.data.sources import data_fingerprint
from streamify.errors import StreamifyError, write_refused
from streamify.io.artifact import clean_pending, save_model_files
from streamify.io.atomic import publish, remove_stale_siblings, temp_sibling
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.io.load import load_checkpoint
from streamify.io.source import Source
from streamify.pipeline.recipe import Recipe
from streamify.progress import SILENT, Progress

ENTRY_RECORD = "stage.json"
KINDS = ("stages", "train", "calibrate", "gguf", "ctranslate2")


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_keys(recipe: Recipe, source: Source, device: torch.device) -> list[str]:
    """The cache key of every stage's output, in order (each chains the one before)."""
    key = _digest({"source": source.fingerprint(), "dtype": recipe.dtype})
    data = data_fingerprint(recipe.data)
    keys = []
    for stage, params in recipe.resolved_stages():
        key = _digest(
            {
                "input": key,
                "stage": stage.name,
                "params": params.model_dump(mode="json"),
                "data": data,
                "seed": recipe.seed,
                "device": device.type,
                "streamify": __version__,
            }
        )
        keys.append(key)
    return keys


class StageCache:
    """Stage outputs stored under ``root/stages/<key>``."""

    def __init__(self, root: Path | None = None) -> None:
        self.folder = (root or cache_root()) / "stages"

    def entry(self, key: str) -> Path:
        """The folder of one entry (it may not exist)."""
        return self.folder / key

    def has(self, key: str) -> bool:
        """True when a complete entry exists for ``key``."""
        return (self.entry(key) / ENTRY_RECORD).is_file()

    def store(self, key: str, checkpoint: Checkpoint, records: list[dict], progress: Progress = SILENT) -> None:
        """Keep ``checkpoint`` (the output of the stages ``records`` describe); a full disk only warns."""
        tmp = None
        try:
            tmp = temp_sibling(self.entry(key))
            save_model_files(checkpoint, tmp)
            record = {
                "key": key,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "model": checkpoint.source.spec,
                "records": records,
                "streaming": checkpoint.streaming,
                "history": checkpoint.history,
            }
            (tmp / ENTRY_RECORD).write_text(json.dumps(record, indent=2, default=str))
            publish(tmp, self.entry(key), complete=lambda entry: (entry / ENTRY_RECORD).is_file())
        except Exception as exc:  # a full disk: an OSError, or safetensors' own error holding one
            if not isinstance(exc, OSError) and write_refused(exc) is None:
                raise
            progress.log(f"warning: could not cache the output of {records[-1]['name']} in {self.folder}: {exc}")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def load(self, key: str, source: Source, device: str) -> tuple[Checkpoint, list[dict]]:
        """The cached checkpoint for ``key`` (as if made from ``source``) and the stage records behind it."""
        folder = self.entry(key)
        record = json.loads((folder / ENTRY_RECORD).read_text())
        checkpoint = load_checkpoint(str(folder), device=device)
        checkpoint.source = source
        checkpoint.history = record["history"]
        checkpoint.streaming = record["streaming"]
        os.utime(folder)  # last use, for `streamify cache clean --older-than`
        return checkpoint, record["records"]

    def resume(
        self, keys: list[str], cacheable: list[bool], source: Source, device: str, progress: Progress = SILENT
    ) -> tuple[int, Checkpoint | None, list[dict]]:
        """The latest cached stage output: ``(index, checkpoint, records)``, or ``(-1, None, [])``.

        An entry that no longer loads (files deleted or damaged by hand) is
        dropped with a warning and an earlier one is tried.
        """
        for index in reversed(range(len(keys))):
            if not (cacheable[index] and self.has(keys[index])):
                continue
            try:
                checkpoint, records = self.load(keys[index], source, device)
            except (StreamifyError, OSError, ValueError, KeyError) as exc:
                progress.log(f"warning: dropping the unreadable cache entry {self.entry(keys[index])}: {exc}")
                shutil.rmtree(self.entry(keys[index]), ignore_errors=True)
                continue
            return index, checkpoint, records
        return -1, None, []


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cache_entries(root: Path | None = None) -> list[dict]:
    """Every cache entry: kind (stages, train, gguf), key, bytes, last use, and for stages what made it."""
    root = root or cache_root()
    entries = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for entry in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            item = {
                "kind": kind,
                "key": entry.name,
                "bytes": _folder_bytes(entry),
                "last_used": datetime.fromtimestamp(entry.stat().st_mtime, UTC).isoformat(timespec="seconds"),
                "path": str(entry),
            }
            record = entry / ENTRY_RECORD
            if record.is_file():
                data = json.loads(record.read_text())
                item["model"] = data.get("model")
                item["stages"] = [r["name"] for r in data.get("records", [])]
            entries.append(item)
    return entries


def clean_cache(root: Path | None = None, *, older_than_days: float | None = None, kinds=KINDS) -> dict:
    """Remove cache entries of ``kinds`` (all, or those unused for ``older_than_days``).

    Temporary folders of killed runs go too: half-written cache entries and
    half-written artifacts next to their output folders.
    """
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    root = root or cache_root()
    stale = clean_pending() + sum(remove_stale_siblings(root / kind) for kind in KINDS)
    removed, freed = 0, 0
    for item in cache_entries(root):
        if item["kind"] not in kinds:
            continue
        path = Path(item["path"])
        if cutoff is not None and path.stat().st_mtime >= cutoff:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
        freed += item["bytes"]
    return {"removed": removed, "freed_bytes": freed + stale, "stale_temp_bytes": stale, "root": str(root)}
