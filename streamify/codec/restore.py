"""Restore an entropy-coded artifact's original files; ``streamify quantize decode`` writes them as an artifact.

The structure is checked before a byte is written: every container's index
(:func:`~streamify.codec.container.read_index`), that their tensors are the
ones config.json's model has, with its shapes, and that side files are regular
files inside the artifact folder. Chunk checksums are checked as the tensors
are decoded, while the files are written: callers write into a staging folder,
so a corrupt chunk leaves no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PretrainedConfig

from streamify.codec.container import CONTAINER_SUFFIX, CodedFolder, container_paths, original_bytes
from streamify.codec.load import check_matches_config
from streamify.errors import InputError
from streamify.io.artifact import check_output, output_lock, staged_folder, write_manifest
from streamify.io.config import read_config
from streamify.io.manifest import MANIFEST_NAME, read_manifest
from streamify.io.model_card import render_model_card
from streamify.io.safetensors_file import aligned_order, write_streamed
from streamify.io.source import SourceFile, check_links, resolve_source, sha256_file
from streamify.progress import SILENT, Progress


def restore_files(path: Path, folder: Path, config: PretrainedConfig | None, threads: int = 1) -> list[Path]:
    """:func:`restore_coded` of one container file."""
    return restore_coded(CodedFolder([path]), folder, config, threads)


def restore_coded(reader: CodedFolder, folder: Path, config: PretrainedConfig | None, threads: int = 1) -> list[Path]:
    """Write the original safetensors files, bit-identical tensors and original metadata, into ``folder``,
    decoding about 64 MB of tensors at a time.

    With ``config``, the containers must hold exactly the model's tensors
    (:func:`~streamify.codec.load.check_matches_config`).
    """
    meta = reader.index
    if config is not None:
        check_matches_config(reader.readers[0].path.parent, meta, config)
    written = []
    for file_name, info in meta["files"].items():
        entries = {n: e for n, e in meta["tensors"].items() if e["file"] == file_name}
        layout = aligned_order([(n, e["dtype"], e["shape"], original_bytes(e)) for n, e in entries.items()])
        tensors = _decoded_bytes(reader, [name for name, *_ in layout], [size for *_, size in layout], threads)
        target = folder / file_name
        write_streamed(target, layout, info.get("metadata") or None, tensors)
        written.append(target)
    return written


_GROUP_BYTES = 64 << 20  # tensors are decoded in groups of about this many bytes: all cores busy, memory bounded


def _decoded_bytes(reader: CodedFolder, names: list[str], sizes: list[int], threads: int) -> Iterator[memoryview]:
    """The bytes of each tensor ``names`` lists, in order, decoded a group of tensors at a time."""
    start = 0
    while start < len(names):
        end, total = start, 0
        while end < len(names) and (end == start or total + sizes[end] <= _GROUP_BYTES):
            total += sizes[end]
            end += 1
        decoded = reader.decode(names[start:end], threads)
        for name in names[start:end]:
            yield _bytes(decoded.pop(name))
        start = end


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A decoded tensor's bytes, as safetensors stores them."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def restore_folder(
    folder: Path, target: Path, config: PretrainedConfig | None, threads: int = 1, skip: frozenset[str] = frozenset()
) -> list[Path]:
    """Copy an artifact folder's other files into ``target`` and restore its safetensors files there.

    Only regular files are copied; a link that leaves ``folder`` is refused.
    """
    containers = container_paths(folder)
    reader = CodedFolder(containers)  # every index is checked before anything is copied
    check_links(folder)
    for path in sorted(folder.iterdir()):
        if path not in containers and path.name not in skip and path.is_file():
            shutil.copyfile(path, target / path.name)
    return restore_coded(reader, target, config, threads)


def decode_artifact(
    artifact: str, output: str, *, overwrite: bool = False, threads: int = 0, progress: Progress = SILENT
) -> dict:
    """Write ``output``: the artifact's files with its containers replaced by the original safetensors files."""
    source = resolve_source(artifact)
    containers = container_paths(source.folder)
    if not containers:
        raise InputError(
            f"{source.folder}: no *{CONTAINER_SUFFIX} container here, so nothing to decode",
            "pass a folder written by streamify quantize entropy",
        )
    out = check_output(output, source.folder, overwrite)
    # checked before the clock starts: building the model class imports its modeling code (seconds)
    check_matches_config(source.folder, CodedFolder(containers).index, read_config(source))
    started = time.perf_counter()
    with output_lock(out), staged_folder(out, overwrite) as tmp:
        progress.log(f"decoding {', '.join(str(c) for c in containers)}")
        threads = threads or os.cpu_count() or 1
        skip = frozenset({MANIFEST_NAME, "README.md"})
        written = restore_folder(source.folder, tmp, None, threads, skip=skip)
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
                "files": [asdict(SourceFile(str(c), sha256_file(c), c.stat().st_size)) for c in containers],
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
