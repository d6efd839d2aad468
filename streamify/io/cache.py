"""Where streamify keeps what it can make again: stage outputs, training and calibration checkpoints, GGUF copies."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """streamify's cache folder: ``$STREAMIFY_CACHE_DIR`` or the user cache dir."""
    env = os.environ.get("STREAMIFY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("streamify"))
