"""The artifact manifest ``streamify.json``: what was made, from what, how, and how good it is."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from streamify import __version__
from streamify.errors import InputError
from streamify.io.checkpoint import Checkpoint

FORMAT = "streamify.manifest"
FORMAT_VERSION = 2  # 2: `files` records the sha256 of every file of the artifact
MANIFEST_NAME = "streamify.json"
_PACKAGES = ("torch", "transformers", "diffusers", "safetensors", "accelerate", "peft", "gguf", "pydantic")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape an artifact."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def build_manifest(
    checkpoint: Checkpoint,
    *,
    stages: list[dict],
    seed: int,
    eval_report: dict | None,
    source_eval: dict | None,
    gates: list[dict],
) -> dict:
    """The manifest of an artifact made from ``checkpoint`` by ``stages`` (their records, in order)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "streamify_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "source": checkpoint.source.to_json(),
        "seed": seed,
        "history": checkpoint.history,
        "stages": stages,
        "streaming": checkpoint.streaming,
        "eval": eval_report,
        "eval_source": source_eval,
        "gates": gates,
    }


def read_manifest(folder: Path) -> dict | None:
    """The streamify manifest of an artifact folder, or None for other checkpoints."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})", "restore the file or re-create the artifact") from exc
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a JSON object", "restore the file or re-create the artifact")
    return manifest
