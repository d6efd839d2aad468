"""A key for "this model's weights, under these settings": where a resumable stage keeps its checkpoints."""

from __future__ import annotations

import hashlib
import json

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
