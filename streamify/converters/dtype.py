"""Stage ``convert.dtype``: cast every floating-point weight to fp32, bf16 or fp16."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from streamify.io.checkpoint import Checkpoint
from streamify.io.placement import DTYPE_NAMES, DTYPES
from streamify.pipeline.registry import StageContext, register


class DtypeParams(BaseModel):
    """Params of ``convert.dtype``."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="dtype to cast floating-point weights to")


def _bytes_per_param(params: DtypeParams, before: float) -> float:
    return DTYPES[params.dtype].itemsize


@register(
    "convert.dtype",
    DtypeParams,
    "cast floating-point weights to fp32, bf16 or fp16",
    relation="quantized",
    bytes_per_param=_bytes_per_param,
)
def convert_dtype(checkpoint: Checkpoint, params: DtypeParams, ctx: StageContext) -> Checkpoint:
    """Cast the model's floating-point parameters and buffers; records the dtypes it saw."""
    model = checkpoint.model
    before = sorted({DTYPE_NAMES.get(p.dtype, str(p.dtype)) for p in model.parameters() if p.is_floating_point()})
    model.to(DTYPES[params.dtype])
    ctx.metrics.update(dtype_before=before, dtype_after=params.dtype)
    return checkpoint
