"""Text sources named by ``--data``: local files and folders, ``hf:`` datasets, ``builtin:pydoc``."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

from streamify import __version__
from streamify.errors import InputError, UsageError
from streamify.io.source import hub_offline, sha256_file

Split = Literal["train", "heldout"]
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DATA_HELP = "a .txt/.jsonl/.parquet file or folder, hf:NAME[:CONFIG[:SPLIT]], or builtin:pydoc"


def load_texts(spec: str, split: Split = "heldout") -> list[str]:
    """The texts of a data source.

    ``builtin:pydoc`` has a fixed train / held-out split; ``hf:`` takes the split
    it names (default ``train``); local files are used whole for any split.
    """
    if spec == "builtin:pydoc":
        from streamify.data.pydoc import pydoc_texts

        return list(pydoc_texts(split))
    if spec.startswith("builtin:"):
        raise UsageError(f"--data {spec}: unknown built-in data set", "use builtin:pydoc")
    if spec.startswith("hf:"):
        return _hf_texts(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"--data {spec}: no such file or folder", f"pass {DATA_HELP}")
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise InputError(f"--data {spec}: no .txt, .jsonl or .parquet files in this folder", f"pass {DATA_HELP}")
    texts = [t for f in files for t in _file_texts(f)]
    if not texts:
        raise InputError(f"--data {spec}: holds no text", "pass a file with text in it")
    return texts


def data_fingerprint(spec: str) -> str:
    """A key that changes when the text behind ``spec`` may have changed.

    Local files: sha256 of their contents. ``builtin:pydoc``: the Python version
    and streamify's (the standard library and the split). ``hf:`` data sets: the
    name itself (a hub data set cannot be hashed without fetching it).
    """
    digest = hashlib.sha256(spec.encode())
    if spec == "builtin:pydoc":
        digest.update(f"{sys.version} {__version__}".encode())
    elif not spec.startswith(("hf:", "builtin:")):
        path = Path(spec).expanduser()
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                digest.update(f"{file.relative_to(path) if path.is_dir() else file.name} ".encode())
                digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    if path.suffix == ".parquet":
        return _parquet_texts(path)
    raise UsageError(f"--data {path}: unsupported file type '{path.suffix}'", f"pass {DATA_HELP}")


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--data {path}: line {number} is not JSON ({exc.msg})", "fix that line") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(
                    f"--data {path}: line {number} has no string field 'text'",
                    'each line must be an object like {"text": "..."}',
                )
            texts.append(record["text"])
    return texts


def _parquet_texts(path: Path) -> list[str]:
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a broken file
        raise InputError(f"--data {path}: unreadable parquet file ({exc})", "check the file") from exc
    return _text_column(table, str(path))


def hf_parts(spec: str) -> tuple[str, str | None, str | None]:
    """``(name, config, split)`` of ``hf:NAME[:CONFIG[:SPLIT]]`` (empty parts None); a :class:`UsageError` when
    malformed."""
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"--data {spec}: malformed data set name", "use hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = [*parts, None, None][:3]
    return name, config or None, split or None


def _hf_texts(spec: str) -> list[str]:
    name, config, split = hf_parts(spec)
    if hub_offline():
        raise InputError(f"--data {spec}: HF_HUB_OFFLINE is set, so the hub data set cannot be fetched", DATA_HELP)
    import datasets

    try:
        table = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # network, missing config, missing split: all reported the same way
        raise InputError(
            f"--data {spec}: could not load the data set ({exc})", "check the name, config and split"
        ) from exc
    return _text_column(table, spec)


def _text_column(table, where: str) -> list[str]:
    if "text" not in table.column_names:
        raise InputError(
            f"--data {where}: no 'text' column (columns: {', '.join(table.column_names)})",
            "provide the text in a column named 'text'",
        )
    return [t for t in table["text"] if isinstance(t, str) and t]
