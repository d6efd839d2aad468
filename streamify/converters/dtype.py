"""Stage ``convert.dtype``: cast every floating-point weight to fp32, bf16 or fp16."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from streamify.codec.blockwise import write_block_by_block
from streamify.codec.container import GROUP_BYTES
from streamify.io.checkpoint import Checkpoint
from streamify.io.placement import DTYPE_NAMES, DTYPES
from streamify.model.cast import cast_floats
from streamify.pipeline.registry import StageContext, register
from streamify.units import ShardSize, shard_bytes


class DtypeParams(BaseModel):
    """Params of ``convert.dtype``."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="dtype to cast floating-point weights to")
    blockwise: Literal["auto", "on", "off"] = Field(
        "auto",
        description="read, cast and write the model one block at a time from its safetensors files (for models "
        "larger than memory; no eval); auto: when the in-memory run would not fit in the memory available",
    )
    max_shard_size: ShardSize = Field(
        "5GB", description="block by block: the artifact's safetensors shards are at most this size (e.g. 5GB)"
    )


def _bytes_per_param(params: DtypeParams, before: float, model) -> float:
    return DTYPES[params.dtype].itemsize


@register(
    "convert.dtype",
    DtypeParams,
    "cast floating-point weights to fp32, bf16 or fp16",
    relation="quantized",
    bytes_per_param=_bytes_per_param,
    kinds="all",
    blockwise=lambda params, model: (params.blockwise, None, 3 * GROUP_BYTES),
)
def convert_dtype(checkpoint: Checkpoint, params: DtypeParams, ctx: StageContext) -> Checkpoint:
    """Cast the floating-point tensors that are saved (parameters, persistent buffers); records the dtypes seen.

    Non-persistent buffers (such as rotary ``inv_freq``) keep their dtype, as
    they do when transformers loads a checkpoint in the target dtype, so the
    in-memory model and the reloaded artifact compute the same logits. Tensors
    the model's class keeps in fp32 (``_keep_in_fp32_modules``, e.g. Wan's
    modulation tables) stay fp32, as transformers and diffusers load them;
    ``kept_fp32`` in the metrics names them (when there are any).
    """
    model = checkpoint.model
    if checkpoint.blocks is not None:  # larger than memory: each block is read, cast and spooled, then dropped
        size = shard_bytes(params.max_shard_size)
        checkpoint.weights_writer = write_block_by_block(
            checkpoint, size, ctx.progress, "casting", DTYPES[params.dtype]
        )
        ctx.metrics.update(dtype_after=params.dtype, path="block-wise")
        return checkpoint
    before = sorted({DTYPE_NAMES.get(p.dtype, str(p.dtype)) for p in model.parameters() if p.is_floating_point()})
    kept = cast_floats(model, DTYPES[params.dtype])
    ctx.metrics.update(dtype_before=before, dtype_after=params.dtype)
    if kept:
        ctx.metrics["kept_fp32"] = kept
    return checkpoint
