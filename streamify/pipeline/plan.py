"""The plan of a run, made without touching weights: what will run, on what, and what it will need."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from streamify.errors import ResourceError
from streamify.eval.report import count_params
from streamify.io.load import instantiate, model_class, read_config
from streamify.io.placement import DTYPES
from streamify.io.source import Source
from streamify.model.attention import attention_layout, summarize_layout
from streamify.model.blocks import find_blocks
from streamify.pipeline.recipe import Recipe

_LOGIT_BYTES = 4 * 3  # fp32 logits, their log-softmax and the gradient-free copy cross_entropy makes


def meta_model(config, trust_remote_code: bool = False):
    """The model built on the meta device: structure and parameter count, no memory, no weights."""
    cls = model_class(config, getattr(config, "name_or_path", "model"))
    with torch.device("meta"):
        return instantiate(cls, config, trust_remote_code)


def load_bytes_per_param(config, dtype: str, source: Source) -> int:
    """Bytes per parameter once loaded: the requested dtype, else the checkpoint's (fp32 for GGUF)."""
    if dtype != "auto":
        return DTYPES[dtype].itemsize
    stored = getattr(config, "dtype", None)
    if source.kind == "gguf" or stored is None:
        return 4
    if isinstance(stored, str):
        stored = getattr(torch, stored, torch.float32)
    return stored.itemsize


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_plan(recipe: Recipe, source: Source, output: Path) -> dict:
    """Resolved stages, model facts and memory/disk estimates for ``recipe``."""
    config = read_config(source, recipe.trust_remote_code)
    model = meta_model(config, recipe.trust_remote_code)
    params = count_params(model)
    found = find_blocks(model)
    n_blocks = len(found[1]) if found else 0
    loaded_per_param = load_bytes_per_param(config, recipe.dtype, source)
    per_param = float(loaded_per_param)
    stages = []
    for stage, stage_params in recipe.resolved_stages():
        per_param = stage.bytes_per_param(stage_params, per_param)
        stages.append({"name": stage.name, "summary": stage.summary, "params": stage_params.model_dump(mode="json")})
    loaded = params * loaded_per_param
    logits = 0
    if recipe.eval is not None:
        logits = recipe.eval.batch_size * recipe.eval.seq_len * getattr(config, "vocab_size", 0) * _LOGIT_BYTES
    return {
        "model": recipe.model,
        "source": {"kind": source.kind, "path": str(source.path)},
        "architecture": type(model).__name__,
        "params": params,
        "blocks": n_blocks,
        "attention": summarize_layout(attention_layout(config, n_blocks)) if n_blocks else None,
        "output": str(output),
        "stages": stages,
        "eval": recipe.eval.model_dump() if recipe.eval else None,
        "gates": recipe.gates.model_dump(exclude_none=True) if recipe.gates else None,
        "estimate": {
            "peak_memory_bytes": int(2 * loaded + logits),
            "disk_bytes": int(params * per_param),
            "available_memory_bytes": available_memory_bytes(),
        },
    }


def check_fits(plan: dict, output: Path) -> None:
    """Refuse (exit 4) a run whose estimated memory or disk exceeds what this machine has free."""
    estimate = plan["estimate"]
    available = estimate["available_memory_bytes"]
    if available is not None and estimate["peak_memory_bytes"] > available:
        raise ResourceError(
            f"{plan['model']}: the run needs about {estimate['peak_memory_bytes'] / 2**30:.1f} GiB of memory, "
            f"{available / 2**30:.1f} GiB is available",
            "free memory, use --dtype bf16, or run on a bigger machine",
        )
    parent = output
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if estimate["disk_bytes"] > free:
        raise ResourceError(
            f"{output}: the artifact needs about {estimate['disk_bytes'] / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free there",
            "free disk space or choose another output folder",
        )
