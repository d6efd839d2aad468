"""Whether a run holds the model in memory or reads it block by block from its files, and why.

A run goes block by block when its one stage can (``Stage.blockwise``), the
source is a folder of safetensors files with a block list, nothing needs the
whole model (no earlier stage, no eval, one process) and either the user asks
for it or the in-memory run would not fit in the memory available.
"""

from __future__ import annotations

from streamify.errors import UsageError
from streamify.io.source import Source
from streamify.model.attention import attention_layout, summarize_layout
from streamify.model.blocks import find_blocks
from streamify.model.params import count_params
from streamify.pipeline.recipe import Recipe
from streamify.units import human_bytes


def blockwise_bytes(model, bytes_per_param: float, working: int) -> int:
    """Peak memory of a block-wise run: the tensors outside the blocks, the largest block twice (its weights
    and the solver's copies) and the stage's ``working`` memory (activations, statistics) for one block."""
    _, blocks = find_blocks(model)
    largest = max(count_params(block) for block in blocks)
    outside = count_params(model) - sum(count_params(block) for block in blocks)
    return int((outside + 2 * largest) * bytes_per_param + working)


def _mixed_attention(model) -> str | None:
    """Why blocks of several attention kinds rule a block-wise run out: it runs every block with the mask and
    positions the model made for block 0. A streaming model's attention makes its own masks."""
    found = find_blocks(model)
    if found is None or getattr(model.config, "streamify_streaming", None) is not None:
        return None
    layout = attention_layout(model.config, len(found[1]))
    if len(set(layout)) == 1:
        return None
    return (
        f"its blocks attend in different ways ({summarize_layout(layout)}), and block by block runs every "
        "block with block 0's attention mask"
    )


def choose_path(
    recipe: Recipe, source: Source, model, bytes_per_param: float, in_memory: int, available: int | None, processes: int
) -> dict:
    """``{"blockwise": bool, "why": str | None}`` (and ``peak_memory_bytes`` when block-wise) for the plan;
    ``why`` is None when no stage of the recipe can run block by block.

    Raises :class:`UsageError` when block by block is asked for (``blockwise: on``) but ruled out.
    """
    stages = recipe.resolved_stages()
    if not stages or stages[-1][0].blockwise is None:
        return {"blockwise": False, "why": None}
    stage, params = stages[-1]
    mode, obstacle, working = stage.blockwise(params, model)
    if mode == "off":
        return {"blockwise": False, "why": "in memory (blockwise: off)"}
    ruled_out = [
        obstacle,
        "stages before it need the whole model in memory" if len(stages) > 1 else None,
        "the eval needs the whole model in memory (run without eval, then streamify eval the artifact where it fits)"
        if recipe.eval is not None
        else None,
        f"a {source.kind} source is not read block by block" if source.kind != "hf-folder" else None,
        "the weights are not in safetensors files"
        if source.kind == "hf-folder" and not any(source.path.glob("*.safetensors"))
        else None,
        "the model has no block list" if find_blocks(model) is None else None,
        "its weights are quantized, and block by block reads floating-point weights"
        if getattr(model.config, "quantization_config", None) is not None
        else None,
        _mixed_attention(model),
        "several processes would each read the model" if processes > 1 else None,
    ]
    ruled_out = [reason for reason in ruled_out if reason]
    if mode == "on" and ruled_out:
        raise UsageError(
            f"{recipe.model}: {stage.name} cannot run block by block here: {'; '.join(ruled_out)}",
            "remove what rules it out, or use blockwise auto/off",
        )
    if mode == "on":
        peak = blockwise_bytes(model, bytes_per_param, working)
        return {"blockwise": True, "why": "block by block, as asked (blockwise: on)", "peak_memory_bytes": peak}
    needs, free = human_bytes(in_memory), human_bytes(available)
    if available is None or in_memory <= available:
        fits = f"about {needs} of {free} available" if available else "free memory unknown"
        return {"blockwise": False, "why": f"in memory: the run fits ({fits})"}
    if ruled_out:
        return {
            "blockwise": False,
            "why": f"in memory, although it needs about {needs} of {free} available: block by block is ruled "
            f"out ({'; '.join(ruled_out)})",
        }
    peak = blockwise_bytes(model, bytes_per_param, working)
    why = f"block by block: in memory the run needs about {needs}, {free} is available"
    return {"blockwise": True, "why": why, "peak_memory_bytes": peak}
