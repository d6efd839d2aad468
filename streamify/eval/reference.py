"""An independent StreamingLLM reference: the plain transformers model, one token at a time.

The streaming runtime (:mod:`streamify.runtime.attention`) computes sink +
window attention with its own code. This reference does not use any of it:
the stock model (its own attention and rotary embedding) decodes one token a
step with transformers' ``DynamicCache``, and between steps the cache of each
``sink_window`` layer is edited to hold exactly what StreamingLLM keeps: the
first ``sinks`` tokens and the ``window - 1`` latest ones. The query runs at
its true position; the sink keys are rotated forward (with the model's own
``apply_rotary_pos_emb``) so that a sink is never further from the query than
``sinks + window - 1`` positions, which is where StreamingLLM places them
inside its cache. ``full`` layers keep every token at its true position. The stock model runs
under SDPA without its own sliding window (a one-token query over a cache it
sees whole needs no mask).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from transformers import DynamicCache

from streamify.errors import UsageError
from streamify.model.blocks import find_blocks
from streamify.progress import SILENT, Progress
from streamify.runtime.spec import SINK_WINDOW, StreamingSpec


def _rotation(model: torch.nn.Module):
    """The model's rotary embedding and its module's ``apply_rotary_pos_emb``."""
    base = getattr(model, model.base_model_prefix, model)
    rotary = getattr(base, "rotary_emb", None)
    _, blocks = find_blocks(model)
    attention = next((b.self_attn for b in blocks if getattr(b, "self_attn", None) is not None), None)
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        raise UsageError(
            f"{type(model).__name__} has no rotary embedding or apply_rotary_pos_emb in transformers",
            "the StreamingLLM reference needs a rotary-position model",
        )
    return rotary, apply


def _shift(keys: torch.Tensor, steps: int, rotary, apply) -> torch.Tensor:
    """``keys`` (rotated at their positions) moved ``steps`` positions later: one more rotation."""
    positions = torch.tensor([[steps]], device=keys.device)
    cos, sin = rotary(keys, positions)
    scale = getattr(rotary, "attention_scaling", 1.0)
    _, shifted = apply(keys, keys, cos / scale, sin / scale)
    return shifted


@contextlib.contextmanager
def _unmasked(model: torch.nn.Module) -> Iterator[None]:
    """SDPA attention and no native sliding window while the reference runs; restored after.

    A config with per-layer ``layer_types`` (a native export) gets its sliding
    layers as full attention (a hybrid's Mamba layers stay); an older one loses
    its ``sliding_window``.
    """
    config = model.config
    implementation = config._attn_implementation
    saved = {key: getattr(config, key, None) for key in ("layer_types", "sliding_window")}
    model.set_attn_implementation("sdpa")
    layer_types = saved["layer_types"]
    sliding = layer_types is not None and any("sliding" in t for t in layer_types)
    if sliding:  # (a hybrid without sliding layers keeps its list: Bamba's cannot even be set)
        config.layer_types = ["full_attention" if "sliding" in t else t for t in layer_types]
    elif saved["sliding_window"] is not None:
        config.sliding_window = None
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)
        if sliding:
            config.layer_types = layer_types
        if saved["sliding_window"] is not None:
            config.sliding_window = saved["sliding_window"]


@torch.inference_mode()
def streamingllm_logits(
    model: torch.nn.Module, ids: torch.Tensor, spec: StreamingSpec, progress: Progress = SILENT
) -> torch.Tensor:
    """Logits (``[tokens, vocab]``, fp32) of the stock ``model`` over ``ids`` (1-D) under StreamingLLM's cache.

    ``model`` must not have streaming enabled: this is the reference the
    runtime is checked against.
    """
    if getattr(model, "streamify_controller", None) is not None:
        raise UsageError("the StreamingLLM reference needs the stock model", "call disable_streaming(model) first")
    rotary, apply = _rotation(model)
    device = next(model.parameters()).device
    rolling = [i for i, kind in enumerate(spec.layer_types) if kind == SINK_WINDOW]
    sink_keys: dict[int, torch.Tensor] = {}  # as first stored, at positions 0..sinks-1
    logits = []
    with _unmasked(model):
        cache = DynamicCache(config=model.config)  # a hybrid's Mamba layers get their state layers
        for position in progress.track(range(ids.numel()), "reference", total=ids.numel()):
            beyond = position - spec.capacity
            for index in rolling if beyond > 0 and spec.sinks else ():
                cache.layers[index].keys[:, :, : spec.sinks] = _shift(sink_keys[index], beyond, rotary, apply)
            step = model(
                ids[position : position + 1][None].to(device),
                position_ids=torch.tensor([[position]], device=device),
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(step.logits[0, -1].float())
            for index in rolling:
                layer = cache.layers[index]
                if position + 1 == spec.sinks:
                    sink_keys[index] = layer.keys[:, :, : spec.sinks].clone()
                if layer.keys.shape[-2] > spec.capacity:
                    keep = [*range(spec.sinks), *range(spec.sinks + 1, layer.keys.shape[-2])]
                    layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
    return torch.stack(logits)
