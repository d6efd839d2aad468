"""The artifact manifest ``streamify.json``: what was made, from what, how, and how good it is."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from streamify import __version__
from streamify.io.checkpoint import Checkpoint

FORMAT = "streamify.manifest"
FORMAT_VERSION = 2  # 2: `files` records the sha256 of every file of the artifact
_PACKAGES = ("torch", "transformers", "safetensors", "accelerate", "peft", "gguf", "pydantic")


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
