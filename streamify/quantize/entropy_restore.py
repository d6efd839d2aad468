"""``streamify quantize decode``: turn an entropy-coded artifact back into a plain safetensors checkpoint."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from streamify.errors import InputError
from streamify.io.artifact import check_output, staged_folder, write_manifest
from streamify.io.load import MANIFEST_NAME, read_manifest
from streamify.io.model_card import render_model_card
from streamify.io.source import SourceFile, resolve_source, sha256_file
from streamify.progress import SILENT, Progress
from streamify.quantize.entropy_format import CONTAINER_NAME, restore_folder


def decode_artifact(
    artifact: str, output: str, *, overwrite: bool = False, threads: int = 0, progress: Progress = SILENT
) -> dict:
    """Write ``output``: the artifact's files with the container replaced by the original safetensors files."""
    source = resolve_source(artifact)
    container = source.folder / CONTAINER_NAME
    if not container.is_file():
        raise InputError(
            f"{source.folder}: no {CONTAINER_NAME} here, so nothing to decode",
            "pass a folder written by streamify quantize entropy",
        )
    out = check_output(output, source.folder, overwrite)
    started = time.perf_counter()
    with staged_folder(out) as tmp:
        progress.log(f"decoding {container}")
        threads = threads or os.cpu_count() or 1
        written = restore_folder(source.folder, tmp, threads, skip=frozenset({MANIFEST_NAME, "README.md"}))
        seconds = time.perf_counter() - started
        raw = sum(p.stat().st_size for p in written)
        manifest = read_manifest(source.folder) or {}
        manifest.update(
            history=manifest.get("history", []) + manifest.get("stages", []),
            stages=[
                {
                    "name": "quantize.decode",
                    "params": {},
                    "seconds": round(seconds, 3),
                    "metrics": {"decoded_bytes": raw, "decode_gb_per_s": raw / seconds / 1e9},
                }
            ],
            source={
                "spec": artifact,
                "kind": "hf-folder",
                "path": str(source.folder),
                "base_model": (manifest.get("source") or {}).get("base_model"),
                "files": [asdict(SourceFile(str(container), sha256_file(container), container.stat().st_size))],
            },
            eval=None,
            eval_source=None,
            gates=[],
        )
        write_manifest(tmp, manifest)
        (tmp / "README.md").write_text(render_model_card(manifest, None))
    return {
        "output": str(out),
        "files": [p.name for p in written],
        "decoded_bytes": raw,
        "seconds": round(seconds, 3),
        "manifest": json.loads((out / MANIFEST_NAME).read_text())["stages"],
    }
