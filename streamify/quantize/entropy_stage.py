"""Stage ``quantize.entropy``: lossless entropy coding of the weights (see ``entropy_format``)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from streamify.io.checkpoint import Checkpoint
from streamify.pipeline.registry import StageContext, register
from streamify.quantize.entropy_codec import DEFAULT_CHUNK_ELEMS
from streamify.quantize.entropy_format import CONTAINER_NAME, encode_file, summarize, write_container


class EntropyParams(BaseModel):
    """Params of ``quantize.entropy``."""

    model_config = ConfigDict(extra="forbid")

    level: int = Field(8, ge=0, le=12, description="pcodec compression level: higher is smaller and slower to encode")
    chunk_elems: int = Field(DEFAULT_CHUNK_ELEMS, ge=4096, description="elements per independently decodable chunk")
    threads: int = Field(0, ge=0, description="encoding threads (0: all cores)")


@register(
    "quantize.entropy",
    EntropyParams,
    "lossless entropy coding of BF16/FP16/FP32 weights (about 66% of BF16 size, bit-exact)",
    bytes_per_param=lambda params, before: before * 0.67,
    final=True,
)
def quantize_entropy(checkpoint: Checkpoint, params: EntropyParams, ctx: StageContext) -> Checkpoint:
    """Code the weights exactly as transformers would save them; the artifact stores the coded container."""
    threads = params.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="streamify-entropy-") as tmp:
        plain = Path(tmp)
        checkpoint.model.save_pretrained(plain, max_shard_size="1000GB")
        side_files = {p.name: p.read_bytes() for p in plain.iterdir() if p.suffix != ".safetensors"}
        stored, index, files = {}, {}, {}
        started = time.perf_counter()
        for path in ctx.progress.track(sorted(plain.glob("*.safetensors")), "entropy coding"):
            file_stored, file_index, files[path.name] = encode_file(path, params.level, params.chunk_elems, threads)
            stored.update(file_stored)
            index.update(file_index)
        seconds = time.perf_counter() - started
    summary = summarize(index, {name: tensor.numel() * tensor.element_size() for name, tensor in stored.items()})
    ctx.metrics.update(summary, encode_gb_per_s=summary["raw_bytes"] / seconds / 1e9, threads=threads)

    def write(folder: Path) -> None:
        for name, data in side_files.items():
            (folder / name).write_bytes(data)
        write_container(folder / CONTAINER_NAME, stored, index, files)

    checkpoint.weights_writer = write
    return checkpoint
