"""The plan of a run, made without touching weights: what will run, on what, and what it will need."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from streamify.distill.trainer import check_share
from streamify.errors import InputError, ResourceError
from streamify.io.cache import cache_root
from streamify.io.config import instantiate, model_class, read_config
from streamify.io.placement import DTYPES, config_dtype
from streamify.io.source import Source
from streamify.kinds import find_kind
from streamify.model.attention import attention_layout, summarize_layout
from streamify.model.blocks import find_blocks
from streamify.model.params import count_params
from streamify.model.patterns import match_patterns, select_modules
from streamify.pipeline.path import choose_path
from streamify.pipeline.recipe import Recipe
from streamify.pipeline.registry import trains, why_not
from streamify.progress import SILENT, Progress

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
    stored = config_dtype(config)
    if source.kind == "gguf" or stored is None:
        return 4
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


def _separate_teacher(dtype: str, params: int, model_bytes: int, device: str) -> tuple[int, str]:
    """Bytes and description of a separate teacher kept in ``dtype`` (``auto``: bf16 on a GPU, else the
    model's own; :func:`~streamify.io.placement.teacher_dtype` decides at run time)."""
    if dtype == "auto":
        on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dtype = "bf16" if on_gpu else "the model's dtype"
    if dtype not in DTYPES:
        return model_bytes, f"a separate copy, frozen, in {dtype}"
    return params * DTYPES[dtype].itemsize, f"a separate copy, frozen, in {dtype}"


def training_bytes(config, model_bytes: int, params: int, heal, seq_len: int, teacher_bytes: int) -> int:
    """Rough peak memory of a healing run: the student, a separate teacher's ``teacher_bytes`` (0 when the
    teacher is the student itself with its LoRA adapters off), optimizer state, one micro-batch's activations.

    Activations per token and layer: about 10 hidden + 4 intermediate values
    in fp32, and the attention mask's row (a byte per key; fused attention
    keeps no scores); logits take six vocab-sized copies per token (teacher,
    student, their log-softmaxes, the gradient); with gradient checkpointing
    only each block's input and one block's activations are kept. Under DDP every process
    holds all of this: the estimate is per process.
    """
    seq_len = heal.seq_len or seq_len
    hidden = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or 0
    vocab = getattr(config, "vocab_size", 0) or 0
    layer = 10 * hidden + 4 * inter + seq_len / 4
    # gradient checkpointing keeps each block's input and one block's activations at a time
    per_token = (layers * hidden + layer if heal.gradient_checkpointing else layers * layer) + 6 * vocab
    activations = 4 * heal.batch_size * seq_len * per_token
    optimizer = 12 * params if heal.lora_rank == 0 else 0  # fp32 grad + two Adam moments
    return int(model_bytes + teacher_bytes + optimizer + activations)


def _lora_modules(model, heal, where: str) -> dict:
    """What the healing's LoRA patterns match on the meta model (errors on a pattern matching nothing)."""
    if not heal.lora_rank:
        return {}
    shown = {}
    for key in ("lora_targets", "lora_ignore"):
        patterns = getattr(heal, key)
        if patterns:
            found = match_patterns(model, patterns, f"{where}.{key}")
            shown[key] = {p: {"count": len(n), "examples": n[:3]} for p, n in found.items()}
    shown["lora_modules"] = len(select_modules(model, heal.lora_targets, heal.lora_ignore, where))
    return shown


def build_plan(
    recipe: Recipe, source: Source, output: Path, cache_hits: list[bool] | None = None, processes: int = 1
) -> dict:
    """Resolved stages, model facts, per-stage cache state, module patterns and memory/disk estimates.

    ``cache_hits[i]`` says whether stage ``i``'s output is in the stage cache
    (None: the cache is off); ``processes`` the processes a launcher started
    (memory estimates are per process).
    """
    config = read_config(source, recipe.trust_remote_code)
    model = meta_model(config, recipe.trust_remote_code)
    kind = find_kind(model)
    if recipe.eval is not None and kind is not None:
        kind.check_eval(model, recipe.eval, f"{recipe.model}: eval")
    params = count_params(model)
    found = find_blocks(model)
    n_blocks = len(found[1]) if found else 0
    loaded_per_param = load_bytes_per_param(config, recipe.dtype, source)
    loaded = params * loaded_per_param
    per_param = float(loaded_per_param)
    stages = []
    shapes_hold = True  # until a stage reshapes the model, its checks can run on the source's meta model
    for index, (stage, stage_params) in enumerate(recipe.resolved_stages()):
        where = f"stages.{index} ({stage.name})"
        resolved = {}
        if shapes_hold:
            reason = why_not(stage, model)
            if reason is not None:
                raise InputError(
                    f"{recipe.model}: {where} does not apply to this model: {reason}",
                    f"streamify inspect {recipe.model} lists the stages that apply",
                )
            resolved = stage.check(stage_params, model, recipe.model) or {}
            shapes_hold = not stage.reshapes
        in_memory = int(params * per_param)
        per_param = stage.bytes_per_param(stage_params, per_param, model)
        training = stage.training(stage_params)
        if processes > 1 and trains(stage, stage_params):
            check_share((training[0] if training else stage_params).grad_accum, processes, where)
        peak = 2 * in_memory + (stage.blockwise(stage_params, model)[2] if stage.blockwise else 0)
        modules = {}
        teacher = holds = None
        if stage.holds is not None:
            peak, holds = stage.holds(stage_params, in_memory, params)
        if training is not None:
            heal, seq_len, teacher_copy = training
            teacher_bytes, teacher = 0, "the model itself, LoRA adapters off"
            if teacher_copy:
                teacher_bytes, teacher = _separate_teacher(heal.teacher_dtype, params, in_memory, recipe.device)
            peak = training_bytes(config, in_memory, params, heal, seq_len, teacher_bytes)
            modules = _lora_modules(model, heal, f"{where}.heal")
        if stage.final:
            cache = "not cached (writes the final format)"
        elif cache_hits is None:
            cache = "off"
        else:
            cache = "hit" if cache_hits[index] else "miss"
        stages.append(
            {
                "name": stage.name,
                "summary": stage.summary,
                "params": stage_params.model_dump(mode="json"),
                "modules": modules,
                "resolved": resolved,
                "cache": cache,
                "estimate": {"peak_memory_bytes": peak, "disk_bytes": int(params * per_param)},
                **({"teacher": teacher} if teacher else {}),
                **({"holds": holds} if holds else {}),
            }
        )
    logits = 0
    if recipe.eval is not None:
        logits = recipe.eval.batch_size * recipe.eval.seq_len * getattr(config, "vocab_size", 0) * _LOGIT_BYTES
    peak = max([2 * loaded + logits] + [s["estimate"]["peak_memory_bytes"] for s in stages])
    available = available_memory_bytes()
    path = choose_path(recipe, source, model, loaded_per_param, int(peak), available, processes)
    if path["blockwise"]:
        peak = stages[-1]["estimate"]["peak_memory_bytes"] = path.pop("peak_memory_bytes")
        if cache_hits is not None and recipe.resolved_stages()[-1][0].progress_in_cache and source.path.is_dir():
            path["progress_dir"] = str(cache_root())
    return {
        "model": recipe.model,
        "source": {"kind": source.kind, "path": str(source.path)},
        "architecture": type(model).__name__,
        "params": params,
        "blocks": n_blocks,
        "attention": summarize_layout(attention_layout(config, n_blocks)) if n_blocks else None,
        "output": str(output),
        "path": path,
        "processes": {
            "count": processes,
            "on_this_machine": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            "training": _strategy(processes),
        },
        "stages": stages,
        "kind": kind.name if kind else None,
        "eval": recipe.eval.model_dump() if recipe.eval else None,
        # the source is evaluated too: for relative gates, or when the kind judges a model by its closeness to it
        "eval_vs_source": recipe.needs_source_eval() or bool(recipe.eval and kind and kind.compares_to_source),
        "gates": recipe.gates.model_dump(exclude_none=True) if recipe.gates else None,
        "estimate": {
            "peak_memory_bytes": int(peak),
            "disk_bytes": int(params * per_param),
            "available_memory_bytes": available,
        },
    }


def _strategy(processes: int) -> str:
    if processes == 1:
        return "one process"
    return (
        f"DDP over {processes} processes: each holds the whole model and runs its share of every step's "
        "micro-batches; memory estimates are per process"
    )


def check_fits(plan: dict, output: Path, progress: Progress = SILENT, device: str = "cpu") -> None:
    """Refuse (exit 4) a run whose estimated memory or disk exceeds what this machine has free.

    The memory estimate is held against this machine's RAM for a run on the CPU;
    on an accelerator (``device``) it is that device's memory the estimate is
    about, which is not measured here, so only the disk is checked. Where the
    free space cannot be measured (a file system that reports no size, such as
    /proc), the disk check steps aside with a warning. A block-wise run that keeps
    its progress under the cache (the plan's ``path.progress_dir``) needs the
    artifact's size free there too when the cache is on another file system
    (on the same one, its shards are renamed into the artifact).
    """
    estimate = plan["estimate"]
    available = estimate["available_memory_bytes"] if str(device).startswith("cpu") else None
    local = plan["processes"]["on_this_machine"]  # each loads the whole model here
    needed = estimate["peak_memory_bytes"] * local
    if available is not None and needed > available:
        processes = f" ({local} processes on this machine)" if local > 1 else ""
        raise ResourceError(
            f"{plan['model']}: the run needs about {needed / 2**30:.1f} GiB of memory{processes}, "
            f"{available / 2**30:.1f} GiB is available",
            "free memory, use --dtype bf16, or run on a bigger machine"
            + ("" if "ruled out" not in (plan["path"]["why"] or "") else f" ({plan['path']['why']})"),
        )
    disk = estimate["disk_bytes"]
    parent, free = _free_bytes(output, progress)
    if free is not None and disk > free:
        raise ResourceError(
            f"{output}: the artifact needs about {disk / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free there",
            "free disk space or choose another output folder",
        )
    kept = plan["path"].get("progress_dir")
    if kept is None:
        return
    kept_parent, free = _free_bytes(Path(kept), progress)
    if free is not None and disk > free and not _same_file_system(kept_parent, parent):
        raise ResourceError(
            f"{kept}: a block-wise run keeps its progress there until it ends (about {disk / 2**30:.1f} GiB, "
            f"the artifact's size), {free / 2**30:.1f} GiB is free there",
            "free space there, point STREAMIFY_CACHE_DIR at a disk with room, or run with --no-cache "
            "(then a killed run starts over)",
        )


def _same_file_system(first: Path, second: Path) -> bool:
    return first.stat().st_dev == second.stat().st_dev


def _free_bytes(folder: Path, progress: Progress) -> tuple[Path, int | None]:
    """The nearest existing folder at or above ``folder`` and its free bytes (None, with a warning, where the
    file system reports no size)."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    usage = shutil.disk_usage(parent)
    if usage.total == 0:
        progress.log(f"warning: {parent} reports no size, so free space there is not checked")
        return parent, None
    return parent, usage.free
