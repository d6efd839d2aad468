"""A key for "this model's weights, under these settings": where a resumable stage keeps its checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from streamify import __version__


def content_key(model: torch.nn.Module, settings: dict) -> str:
    """sha256 (32 hex digits) of every tensor in ``model``'s state dict, ``settings`` and the streamify version."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps({**settings, "v": __version__}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def files_key(folder: Path, settings: dict) -> str:
    """sha256 (32 hex digits) of ``folder``'s safetensors files (names, sizes, modification times: a model
    larger than memory is not read to be hashed), its config.json, ``settings`` and the streamify version."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    digest.update(json.dumps({**settings, "v": __version__}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]
