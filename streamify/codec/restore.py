"""Restore an entropy-coded artifact's original files; ``streamify quantize decode`` writes them as an artifact.

Everything read from the artifact is checked before a byte is written: the
container's index (:func:`~streamify.codec.container.read_index`), that
its tensors are the ones config.json's model has, with its shapes, and that
side files are regular files inside the artifact folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PretrainedConfig

from streamify.codec.container import CONTAINER_NAME, ContainerReader, read_index
from streamify.codec.load import check_matches_config
from streamify.errors import InputError
from streamify.io.artifact import check_output, output_lock, staged_folder, write_manifest
from streamify.io.config import read_config
from streamify.io.manifest import MANIFEST_NAME, read_manifest
from streamify.io.model_card import render_model_card
from streamify.io.safetensors_file import DTYPE_BYTES, aligned_order, write_streamed
from streamify.io.source import SourceFile, check_links, resolve_source, sha256_file
from streamify.progress import SILENT, Progress


def restore_files(
    path: Path, folder: Path, config: PretrainedConfig | None, threads: int = 1, meta: dict | None = None
) -> list[Path]:
    """Write the original safetensors files, bit-identical tensors and original metadata, into ``folder``,
    one tensor decoded at a time.

    With ``config``, the container must hold exactly the model's tensors
    (:func:`~streamify.codec.load.check_matches_config`). ``meta``: the
    container's index when the caller has read it already.
    """
    meta = meta or read_index(path)
    if config is not None:
        check_matches_config(path, meta, config)
    reader = ContainerReader(path, meta)
    written = []
    for file_name, info in meta["files"].items():
        entries = {n: e for n, e in meta["tensors"].items() if e["file"] == file_name}
        layout = aligned_order([(n, e["dtype"], e["shape"], _nbytes(e)) for n, e in entries.items()])
        tensors = (_bytes(reader.decode([name], threads)[name]) for name, *_ in layout)
        target = folder / file_name
        write_streamed(target, layout, info.get("metadata") or None, tensors)
        written.append(target)
    return written


def _nbytes(entry: dict) -> int:
    count = 1
    for dim in entry["shape"]:
        count *= dim
    return count * DTYPE_BYTES[entry["dtype"]]


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A decoded tensor's bytes, as safetensors stores them."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def restore_folder(
    folder: Path, target: Path, config: PretrainedConfig, threads: int = 1, skip: frozenset[str] = frozenset()
) -> list[Path]:
    """Copy an artifact folder's other files into ``target`` and restore its safetensors files there.

    Only regular files are copied; a link that leaves ``folder`` is refused.
    """
    container = folder / CONTAINER_NAME
    meta = read_index(container)  # the whole index is checked before anything is copied
    check_links(folder)
    for path in sorted(folder.iterdir()):
        if path.name != CONTAINER_NAME and path.name not in skip and path.is_file():
            shutil.copyfile(path, target / path.name)
    return restore_files(container, target, config, threads, meta)


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
    config = read_config(source)
    started = time.perf_counter()
    with output_lock(out), staged_folder(out, overwrite) as tmp:
        progress.log(f"decoding {container}")
        threads = threads or os.cpu_count() or 1
        skip = frozenset({MANIFEST_NAME, "README.md"})
        written = restore_folder(source.folder, tmp, config, threads, skip=skip)
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
        (tmp / "README.md").write_text(render_model_card(manifest, None, tmp))
    return {
        "output": str(out),
        "files": [p.name for p in written],
        "decoded_bytes": raw,
        "seconds": round(seconds, 3),
        "manifest": json.loads((out / MANIFEST_NAME).read_text())["stages"],
    }
