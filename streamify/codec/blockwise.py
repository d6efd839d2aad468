"""Entropy coding of a model read block by block from its safetensors files (larger than memory).

The block-wise executor brings one block's tensors in; they are coded into the
current container's spool and dropped before the next block is read. A new
container is started when the current one would pass the shard size, and the
containers are named at the end as transformers names its shards
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``), so ``quantize decode`` gives back a
checkpoint transformers loads. Tied weights are stored once, under their first
name, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from streamify.codec.container import (
    SAFETENSORS_DTYPES,
    CodedCheckpoint,
    Spool,
    encode_group,
)
from streamify.io.checkpoint import Checkpoint
from streamify.model.blocks import block_tensors
from streamify.progress import Progress

INDEX_NAME = "model.safetensors.index.json"


class _Shards:
    """Containers being coded: tensors go into the current one until it would pass ``shard_bytes``."""

    def __init__(self, shard_bytes: int, level: int, chunk_elems: int, threads: int) -> None:
        self.shard_bytes, self.level, self.chunk_elems, self.threads = shard_bytes, level, chunk_elems, threads
        self.spools: list[Spool] = []
        self.raw_bytes: list[int] = []
        self.index: dict[str, dict] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Code ``tensors`` (one block's, or those outside the blocks); a tensor met twice (tied) is stored once."""
        group, seen = [], set()  # ids within one call only: a dropped block's ids are reused by the next
        for name, tensor in tensors.items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            value = tensor.detach().cpu().contiguous()
            stored = value.reshape(-1).view(torch.uint8).numpy() if value.numel() else bytearray()
            group.append((name, {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape)}, stored))
        size = sum(len(data) for _, _, data in group)
        if not self.spools or (self.raw_bytes[-1] and self.raw_bytes[-1] + size > self.shard_bytes):
            self.spools.append(Spool())
            self.raw_bytes.append(0)
        self.raw_bytes[-1] += size
        shard = len(self.spools) - 1
        found = encode_group(str(shard), group, self.level, self.chunk_elems, self.threads, self.spools[-1])
        self.index.update(found)

    def finish(self) -> tuple[dict[str, Spool], dict[str, dict], dict | None]:
        """The spools and index under the shards' final file names, and transformers' shard index (several)."""
        count = len(self.spools)
        names = ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in
                                                          range(1, count + 1)]  # fmt: skip
        for entry in self.index.values():
            entry["file"] = names[int(entry["file"])]
        weight_map = {name: entry["file"] for name, entry in sorted(self.index.items())}
        shard_index = {"metadata": {"total_size": sum(self.raw_bytes)}, "weight_map": weight_map} if count > 1 else None
        return dict(zip(names, self.spools, strict=True)), self.index, shard_index


def code_block_by_block(
    checkpoint: Checkpoint, shard_bytes: int, level: int, chunk_elems: int, threads: int, progress: Progress
) -> CodedCheckpoint:
    """Code a model loaded block-wise (``checkpoint.blocks``), one block in memory at a time."""
    model, executor = checkpoint.model, checkpoint.blocks
    shards = _Shards(shard_bytes, level, chunk_elems, threads)
    started = time.perf_counter()
    for index in progress.track(range(len(executor.blocks)), "entropy coding block by block"):
        with executor.block(index):
            shards.add(block_tensors(model, executor.prefix, index))
    shards.add(block_tensors(model, executor.prefix, None))
    spools, index, shard_index = shards.finish()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="streamify-entropy-config-") as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        side_files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    if shard_index is not None:
        side_files[INDEX_NAME] = (json.dumps(shard_index, indent=2) + "\n").encode()
    files = {name: {"metadata": {"format": "pt"}} for name in spools}
    return CodedCheckpoint(spools, index, files, side_files, seconds)
