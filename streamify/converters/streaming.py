"""Stage ``convert.streaming``: attention sinks + sliding window, hybrid full layers, optional healing.

The weights stay as they are (or are healed); the streaming spec goes into
``config.json`` (key ``streamify_streaming``) and the manifest, and
``streamify.load()`` then runs the model with sink + window attention and a
bounded cache. ``export_arch: native`` writes the weights in a transformers
architecture with per-layer sliding windows (see :mod:`streamify.converters.native`).
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamify.arch import supported
from streamify.converters.native import native_target, to_native
from streamify.distill.heal import HealParams, heal
from streamify.eval.perplexity import perplexity
from streamify.eval.streaming import stream_ids
from streamify.io.checkpoint import Checkpoint
from streamify.model.blocks import layer_count
from streamify.pipeline.registry import StageContext, register
from streamify.runtime.attention import check_streamable, disable_streaming, enable_streaming, ssm_layers
from streamify.runtime.spec import CONFIG_KEY, StreamingSpec, make_spec

NATIVE_NOTE = (
    "native runtimes (transformers, vLLM) run the sink_window layers as plain sliding-window layers, which "
    "have no attention sinks, so this export has none (and was healed without them); keeping some layers "
    "full (--full-layers, e.g. middle-third) is the quality option both runtimes run"
)


class StreamingParams(BaseModel):
    """Params of ``convert.streaming``."""

    model_config = ConfigDict(extra="forbid")

    sinks: int = Field(
        4, ge=0, description="attention-sink tokens kept from the start of the stream (export_arch native: 0)"
    )
    window: int = Field(1024, ge=1, description="most recent tokens each token attends to, itself included")
    full_layers: str | list[int] = Field(
        "none", description="layers that keep full attention: none, every:K, middle-third or a list of indices"
    )
    export_arch: Literal["same", "native"] = Field(
        "same", description="same: the source architecture; native: one with per-layer sliding windows"
    )
    native_check_tokens: int = Field(
        4096,
        ge=0,
        description="export_arch native: held-out tokens on which plain transformers' perplexity of the export "
        "is measured against full attention (0: not measured)",
    )
    heal: HealParams = Field(default_factory=HealParams, description="healing under the streaming pattern")

    @model_validator(mode="after")
    def _sinks_fit_the_window(self) -> StreamingParams:
        if self.export_arch == "native" and self.sinks:
            if "sinks" in self.model_fields_set:
                raise ValueError(
                    f"sinks ({self.sinks}) with export_arch native: transformers and vLLM run sliding windows "
                    "without attention sinks, so a native export has none; leave sinks out (native uses 0), "
                    "or use export_arch same to keep them (streamify.load() runs the sinks)"
                )
            self.sinks = 0
        if self.sinks > self.window:
            raise ValueError(
                f"sinks ({self.sinks}) is larger than window ({self.window}): keep a few sink tokens "
                "(4 is the default) and a window much larger than that"
            )
        return self


def _perplexity(model, ids) -> float:
    """Perplexity of ``model`` as it stands (no streamify runtime) over ``ids`` in one window."""
    return round(perplexity(model, ids[None].to(next(model.parameters()).device))["perplexity"], 4)


def _plan_check(params: StreamingParams, model, where: str) -> dict:
    """The spec against the model's layers (full-layer indices in range), before any weight is read."""
    check_streamable(model, where)
    spec = _spec(params, model)
    return {"full_layers": spec.full_layers}


def _spec(params: StreamingParams, model) -> StreamingSpec:
    """The spec for ``model``: a hybrid's Mamba layers keep their state (``ssm``), the others get the pattern."""
    return make_spec(params.sinks, params.window, params.full_layers, layer_count(model.config), ssm_layers(model))


@register(
    "convert.streaming",
    StreamingParams,
    "bounded-memory attention: sinks + sliding window, optional full layers (LongGen hybrid) and healing",
    relation="finetune",
    training=lambda p: (p.heal, 2 * (p.sinks + p.window), not p.heal.lora_rank) if p.heal.steps else None,
    check=_plan_check,
    applies=lambda model: (
        None
        if model.config.model_type in supported("streaming")
        else f"the streaming runtime does not support '{model.config.model_type}' "
        f"(supported: {', '.join(supported('streaming'))})"
    ),
)
def convert_streaming(checkpoint: Checkpoint, params: StreamingParams, ctx: StageContext) -> Checkpoint:
    """Make the model stream per ``params``; heal it first when ``heal.steps`` > 0."""
    model = checkpoint.model
    where = checkpoint.source.spec
    check_streamable(model, where)
    spec = _spec(params, model)
    native = params.export_arch == "native"
    if native:
        native_target(model.config)
    disable_streaming(model)
    check = None
    if native and params.native_check_tokens:
        ids = stream_ids(checkpoint.tokenizer, ctx.data, params.native_check_tokens)
        ctx.progress.log(f"full attention: perplexity over {ids.numel()} held-out tokens (the native export's anchor)")
        check = {"tokens": ids.numel(), "data": ctx.data, "full_attention_perplexity": _perplexity(model, ids)}
    if params.heal.steps:
        teacher = copy.deepcopy(model) if not params.heal.lora_rank else None  # LoRA: the model itself, no copy
        enable_streaming(model, spec)
        model, metrics = heal(
            model,
            teacher,
            checkpoint.tokenizer,
            params.heal,
            seq_len=2 * (spec.sinks + spec.window),
            data=ctx.data,
            seed=ctx.seed,
            resumable=ctx.use_cache,
            progress=ctx.progress,
        )
        disable_streaming(model)
        del teacher
        ctx.metrics.update(metrics)
    record = {"export_arch": params.export_arch}
    if native:
        model = to_native(model, spec)
        record["native_note"] = NATIVE_NOTE
        if check is not None:
            ctx.progress.log("the native export in plain transformers: perplexity over the same tokens")
            check["perplexity"] = _perplexity(model, ids)
            check["ratio"] = check["perplexity"] / check["full_attention_perplexity"]
            record["native_check"] = check
            ctx.metrics["native_perplexity_ratio"] = round(check["ratio"], 4)
    record = {**spec.to_json(), **record, "architecture": type(model).__name__}
    setattr(model.config, CONFIG_KEY, spec.to_json())
    enable_streaming(model, spec)
    checkpoint.model = model
    checkpoint.streaming = record
    ctx.metrics.update(sinks=spec.sinks, window=spec.window, full_layers=spec.full_layers)
    return checkpoint
