"""Stage ``convert.causal_video``: a bidirectional video diffusion transformer becomes block-causal.

The weights stay as they are; the chunking (``chunk_frames`` latent frames a
chunk, optional ``sink_frames`` + ``window_frames`` rolling cache) goes into
``config.json`` (key ``streamify_causal_video``) and the manifest, and
``streamify.load()`` then runs the model with block-causal self-attention
(:mod:`streamify.runtime.causal_video`): the student that ODE initialisation
and self-forcing distillation train. The stage checks the runtime against the
stock diffusers model under the same mask before it writes anything.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from streamify.eval.video import check_video_equivalence
from streamify.io.checkpoint import Checkpoint
from streamify.pipeline.registry import StageContext, register
from streamify.runtime.causal_video import CONFIG_KEY, VideoSpec, enable_causal_video, video_parts

EQUIVALENCE_LIMITS = {"float32": 1e-4, "float64": 1e-8}  # relative to the output's scale; half precision: 3e-2
HALF_LIMIT = 3e-2  # different attention kernels (masked or not) round bf16/fp16 differently


class CausalVideoParams(BaseModel):
    """Params of ``convert.causal_video``."""

    model_config = ConfigDict(extra="forbid")

    chunk_frames: int = Field(3, ge=1, description="latent frames per chunk (Self-Forcing: 3)")
    sink_frames: int = Field(0, ge=0, description="latent frames a rolling cache keeps from the start")
    window_frames: int | None = Field(
        None, ge=1, description="latest latent frames a rolling cache keeps before the chunk (None: every frame)"
    )
    check: bool = Field(True, description="check the runtime against the stock model under the same mask")


def _spec(params: CausalVideoParams) -> VideoSpec:
    return VideoSpec(params.chunk_frames, params.sink_frames, params.window_frames)


def _plan_check(params: CausalVideoParams, model, where: str) -> dict:
    """The family has a causal-video layout and the chunking is valid, before any weight is read."""
    video_parts(model, where)
    return _spec(params).to_json()


@register(
    "convert.causal_video",
    CausalVideoParams,
    "block-causal video denoiser: chunks of latent frames, a per-chunk KV cache, optional sinks + rolling window",
    relation="finetune",
    kinds=("denoiser",),
    check=_plan_check,
)
def convert_causal_video(checkpoint: Checkpoint, params: CausalVideoParams, ctx: StageContext) -> Checkpoint:
    """Make the denoiser block-causal per ``params``; record the equivalence check in the metrics."""
    model = checkpoint.model
    spec = _spec(params)
    enable_causal_video(model, spec, checkpoint.source.spec)
    if params.check:
        ctx.progress.log("checking the block-causal runtime against the stock model under the same mask")
        result = check_video_equivalence(model)
        ctx.metrics["equivalence"] = result
        limit = EQUIVALENCE_LIMITS.get(result["dtype"], HALF_LIMIT)
        if result["max_rel_diff"] > limit:
            raise RuntimeError(
                f"convert.causal_video: the runtime differs from the stock model by {result['max_rel_diff']:.2e} "
                f"of the output's scale ({result['dtype']}, limit {limit:g}); this is a bug, please report it"
            )
    model.register_to_config(**{CONFIG_KEY: spec.to_json()})
    ctx.metrics.update(spec.to_json())
    return checkpoint
