"""Writing a model read block by block from its safetensors files (larger than memory): entropy-coded
containers (``quantize.entropy``), or plain safetensors in another dtype (``convert.dtype``) or with
fewer blocks (``prune.depth``).

The block-wise executor brings one block's tensors in; they are (cast and)
coded or stored into the current shard's spool and dropped before the next
block is read. A new shard is started when the current one would pass the shard
size, and the shards are named at the end as transformers names them
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``), so the result (or what ``quantize decode``
restores from it) is a checkpoint transformers loads. Tied weights are stored
once, under their first name, as ``save_pretrained`` does.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from streamify.codec.container import SAFETENSORS_DTYPES, CodedCheckpoint, Spool, encode_group
from streamify.io.checkpoint import Checkpoint
from streamify.io.config import is_diffusers
from streamify.io.safetensors_file import INDEX_NAME, shard_index, shard_names
from streamify.model.blocks import block_tensors
from streamify.model.cast import keeps_fp32
from streamify.progress import Progress

Store = Callable[[str, list, Spool], dict[str, dict]]  # (shard, [(name, entry, bytes)], spool) -> index entries


class _Shards:
    """Shards being written: tensors go into the current one until it would pass ``shard_bytes``."""

    def __init__(self, shard_bytes: int, store: Store) -> None:
        self.shard_bytes, self.store = shard_bytes, store
        self.spools: list[Spool] = []
        self.raw_bytes: list[int] = []
        self.index: dict[str, dict] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` (one block's, or those outside the blocks; tied ones already once)."""
        group = []
        for name, tensor in tensors.items():
            value = tensor.detach().cpu().contiguous()
            stored = value.reshape(-1).view(torch.uint8).numpy() if value.numel() else bytearray()
            group.append((name, {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape)}, stored))
        size = sum(len(data) for _, _, data in group)
        if not self.spools or (self.raw_bytes[-1] and self.raw_bytes[-1] + size > self.shard_bytes):
            self.spools.append(Spool())
            self.raw_bytes.append(0)
        self.raw_bytes[-1] += size
        self.index.update(self.store(str(len(self.spools) - 1), group, self.spools[-1]))

    def finish(self) -> tuple[dict[str, Spool], dict[str, dict], dict[str, bytes]]:
        """The spools and index under the shards' final file names, and the side file of transformers' shard
        index (when there are several)."""
        names = shard_names(len(self.spools))
        for entry in self.index.values():
            entry["file"] = names[int(entry["file"])]
        weight_map = {name: entry["file"] for name, entry in self.index.items()}
        side = {INDEX_NAME: shard_index(weight_map, sum(self.raw_bytes)).encode()} if len(names) > 1 else {}
        return dict(zip(names, self.spools, strict=True)), self.index, side


def _store_blocks(
    checkpoint: Checkpoint,
    shards: _Shards,
    progress: Progress,
    what: str,
    cast: torch.dtype | None = None,
    keep: list[int] | None = None,
) -> None:
    """Store the blocks of a block-wise model (only ``keep``, renumbered from 0, when given), then the tensors
    outside its blocks."""
    model, executor = checkpoint.model, checkpoint.blocks

    def tensors(index: int | None, new_index: int | None = None) -> dict[str, torch.Tensor]:
        found, seen = {}, set()
        old, new = f"{executor.prefix}.{index}.", f"{executor.prefix}.{new_index}."
        for name, tensor in block_tensors(model, executor.prefix, index).items():
            if id(tensor) not in seen:  # tied: once, under its first name (before a cast makes two tensors)
                seen.add(id(tensor))
                cast_it = cast is not None and tensor.is_floating_point() and not keeps_fp32(model, name)
                found[new + name.removeprefix(old) if index is not None else name] = (
                    tensor.to(cast) if cast_it else tensor
                )
        return found

    order = list(range(len(executor.blocks))) if keep is None else keep
    for new_index, index in enumerate(progress.track(order, f"{what} block by block")):
        with executor.block(index):
            shards.add(tensors(index, new_index))
    shards.add(tensors(None))


def side_files(model, cast: torch.dtype | None = None) -> dict[str, bytes]:
    """config.json and generation_config.json as ``save_pretrained`` writes them (the dtype set to ``cast``, the
    tensors' dtype when they were cast or read in another than the stored one)."""
    if cast is not None and not is_diffusers(model.config):
        model.config.dtype = cast
    with tempfile.TemporaryDirectory(prefix="streamify-config-") as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def code_block_by_block(
    checkpoint: Checkpoint, shard_bytes: int, level: int, chunk_elems: int, threads: int, progress: Progress
) -> CodedCheckpoint:
    """Code a model loaded block-wise (``checkpoint.blocks``), one block in memory at a time."""
    shards = _Shards(
        shard_bytes, functools.partial(encode_group, level=level, chunk_elems=chunk_elems, threads=threads)
    )
    started = time.perf_counter()
    _store_blocks(checkpoint, shards, progress, "entropy coding")
    spools, index, shard_files = shards.finish()
    files = {name: {"metadata": {"format": "pt"}} for name in spools}
    coded_side = side_files(checkpoint.model, checkpoint.blocks.dtype) | shard_files
    return CodedCheckpoint(spools, index, files, coded_side, time.perf_counter() - started)


def write_block_by_block(
    checkpoint: Checkpoint,
    shard_bytes: int,
    progress: Progress,
    what: str,
    cast: torch.dtype | None = None,
    keep: list[int] | None = None,
) -> Callable[[Path], None]:
    """Spool a model loaded block-wise as plain safetensors shards, one block in memory at a time: cast to
    ``cast`` (what its class keeps in fp32 stays), only the blocks ``keep`` (renumbered) when given. Returns
    the writer of the shards and of the config as the model's config is when the writer runs (a stage that
    removes blocks slices it after this call)."""
    shards = _Shards(shard_bytes, functools.partial(encode_group, code=False))
    _store_blocks(checkpoint, shards, progress, what, cast, keep)
    spools, _, shard_files = shards.finish()

    def write(folder: Path) -> None:
        stored = cast if cast is not None else checkpoint.blocks.dtype  # what the tensors were read or cast to
        for name, data in (side_files(checkpoint.model, stored) | shard_files).items():
            (folder / name).write_bytes(data)
        for name, spool in spools.items():
            spool.write(folder / name, {"format": "pt"})
            spool.close()

    return write
