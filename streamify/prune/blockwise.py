"""``prune.depth`` for a model larger than memory: scores and surgery one block at a time from its files.

The calibration rows' hidden states enter block 0 (the embeddings run once),
then each block is read, run on every row and dropped. In memory are the
states entering and leaving the block that runs (``bi``'s adjacent cosines);
each boundary's states wait on disk until the block ``span`` further on has
run (``angular``'s span distances). Both are summed in the same order as in
the in-memory path, so the scores are the same. The kept blocks are then read
again one at a time and written under their new numbers as safetensors shards,
and the model's config is sliced as :func:`~streamify.prune.surgery.remove_blocks`
slices it in memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from streamify.codec.blockwise import write_block_by_block
from streamify.io.atomic import save_torch
from streamify.io.checkpoint import Checkpoint
from streamify.model.executor import BlockExecutor
from streamify.progress import Progress
from streamify.prune.scores import BoundaryTotals
from streamify.prune.surgery import remove_blocks


@torch.no_grad()
def boundary_stats_block_by_block(executor: BlockExecutor, ids: torch.Tensor, span: int, progress: Progress) -> dict:
    """:func:`~streamify.prune.scores.boundary_stats` with one block's weights in memory at a time; the states
    at earlier boundaries wait on disk until the span's far end reaches them."""
    # no KV cache: each row's would travel with its inputs and grow by every block's keys and values
    quiet = {"use_cache": False} if getattr(executor.model.config, "use_cache", None) is not None else {}
    inputs = executor.first_inputs(ids, lambda model, row: model(row[None].to(executor.device), **quiet))
    count = len(executor.blocks)
    totals = BoundaryTotals(count, span)
    totals.tokens = ids.numel()
    with tempfile.TemporaryDirectory(prefix="streamify-prune-") as tmp, executor.embeddings_away():
        offloaded = _Offloaded(Path(tmp))
        entering = [hidden for hidden, _, _ in inputs]
        offloaded.put(0, entering)
        for index in progress.track(range(count), "scoring blocks block by block"):
            inputs = executor.run_block(index, inputs)
            leaving = [hidden for hidden, _, _ in inputs]
            for before, after in zip(entering, leaving, strict=True):
                totals.add_block(index, before, after)
            if index + 1 >= span:
                for first, last in zip(offloaded.take(index + 1 - span), leaving, strict=True):
                    totals.add_span(index + 1 - span, first, last)
            offloaded.put(index + 1, leaving)
            entering = leaving
    return totals.stats()


class _Offloaded:
    """Hidden states at block boundaries, kept on disk until taken (once each)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, boundary: int, states: list[torch.Tensor]) -> None:
        save_torch(states, self.folder / f"{boundary}.pt")

    def take(self, boundary: int) -> list[torch.Tensor]:
        path = self.folder / f"{boundary}.pt"
        states = torch.load(path, weights_only=True)
        path.unlink()
        return states


def write_kept_blocks(checkpoint: Checkpoint, remove: list[int], shard_bytes: int, progress: Progress) -> None:
    """Set the checkpoint's writer to the blocks not in ``remove``, read again one at a time and renumbered, and
    slice its (empty) model's block list and config as in memory."""
    keep = [i for i in range(len(checkpoint.blocks.blocks)) if i not in remove]
    checkpoint.weights_writer = write_block_by_block(checkpoint, shard_bytes, progress, "writing", keep=keep)
    remove_blocks(checkpoint.model, remove, checkpoint.source.spec)
