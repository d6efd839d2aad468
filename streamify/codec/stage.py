"""Stage ``quantize.entropy``: lossless entropy coding of the weights (see :mod:`streamify.codec.container`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from streamify.codec.blockwise import code_block_by_block
from streamify.codec.codec import DEFAULT_CHUNK_ELEMS, DEFAULT_LEVEL, MAX_CHUNK_ELEMS
from streamify.codec.container import GROUP_BYTES, code_checkpoint
from streamify.io.checkpoint import Checkpoint
from streamify.pipeline.registry import StageContext, register
from streamify.units import ShardSize, shard_bytes

# The plan's estimate of stored / raw bytes. 16-bit: 0.67, measured for bf16 (BENCHMARKS.md, 66.1% on SmolLM2).
# fp32: sign + about 2.6 coded exponent bits + 23 raw mantissa bits of 32. Floats dequantized from a low-bit
# format (a GGUF source) have few distinct mantissas and code far smaller: the built-in model's fp32 weights
# code to 0.43, so for them the estimate is an upper bound.
CODED_HALF = 0.67
CODED_FP32 = 0.83


class EntropyParams(BaseModel):
    """Params of ``quantize.entropy``."""

    model_config = ConfigDict(extra="forbid")

    level: int = Field(
        DEFAULT_LEVEL, ge=0, le=12, description="pcodec compression level: higher is smaller and slower to encode"
    )
    chunk_elems: int = Field(
        DEFAULT_CHUNK_ELEMS, ge=4096, le=MAX_CHUNK_ELEMS, description="elements per independently decodable chunk"
    )
    threads: int = Field(0, ge=0, description="encoding threads (0: all cores)")
    max_shard_size: ShardSize = Field(
        "5GB",
        description="the checkpoint is saved in shards of at most this size (transformers' max_shard_size, e.g. "
        "5GB, 500MB), each coded into a container file of its own",
    )

    blockwise: Literal["auto", "on", "off"] = Field(
        "auto",
        description="read and code the model one block at a time from its safetensors files (for models larger "
        "than memory; no eval); auto: when the in-memory run would not fit in the memory available",
    )


@register(
    "quantize.entropy",
    EntropyParams,
    "lossless entropy coding of BF16/FP16/FP32 weights (about 66% of BF16 size) and packed INT4 codes, bit-exact",
    bytes_per_param=lambda params, before, model: before * (CODED_FP32 if before >= 4 else CODED_HALF),
    kinds="all",
    final=True,
    blockwise=lambda params, model: (params.blockwise, None, 3 * GROUP_BYTES),
)
def quantize_entropy(checkpoint: Checkpoint, params: EntropyParams, ctx: StageContext) -> Checkpoint:
    """Code the weights exactly as transformers would save them; the artifact stores the coded container."""
    threads = params.threads or os.cpu_count() or 1

    def save(folder: Path) -> None:
        checkpoint.model.save_pretrained(folder, max_shard_size=params.max_shard_size)

    if checkpoint.blocks is not None:
        size = shard_bytes(params.max_shard_size)
        coded = code_block_by_block(checkpoint, size, params.level, params.chunk_elems, threads, ctx.progress)
        ctx.metrics["path"] = "block-wise"
    else:
        coded = code_checkpoint(save, params.level, params.chunk_elems, threads, ctx.progress)
    ctx.metrics.update(coded.summary(), threads=threads)
    checkpoint.weights_writer = coded.write
    return checkpoint
