"""``prune.depth`` for a model larger than memory: scores and surgery one block at a time from its files.

The calibration rows' hidden states enter block 0 (the embeddings run once),
then each block is read, run on every row and dropped; the states of the last
``span + 1`` boundaries are all that is kept, enough for ``bi``'s adjacent
cosines and ``angular``'s span distances, summed in the same order as the
in-memory path, so the scores are the same. The kept blocks are then read
again one at a time and written under their new numbers as safetensors shards,
and the model's config is sliced as :func:`~streamify.prune.surgery.remove_blocks`
slices it in memory.
"""

from __future__ import annotations

from collections import deque

import torch

from streamify.codec.blockwise import write_block_by_block
from streamify.io.checkpoint import Checkpoint
from streamify.model.executor import BlockExecutor
from streamify.progress import Progress
from streamify.prune.scores import BoundaryTotals, allowed_blocks, choose
from streamify.prune.surgery import check_removal, remove_blocks


@torch.no_grad()
def boundary_stats_block_by_block(executor: BlockExecutor, ids: torch.Tensor, span: int, progress: Progress) -> dict:
    """:func:`~streamify.prune.scores.boundary_stats` with one block's weights in memory at a time."""
    inputs = executor.first_inputs(ids, lambda model, row: model(row[None].to(executor.device)))
    count = len(executor.blocks)
    totals = BoundaryTotals(count, span)
    totals.tokens = ids.numel()
    states = deque([[hidden for hidden, _, _ in inputs]], maxlen=span + 1)  # the last span + 1 boundaries
    with executor.embeddings_away():  # blocks never use them; a large vocabulary can outweigh several blocks
        for index in progress.track(range(count), "scoring blocks block by block"):
            inputs = executor.run_block(index, inputs)
            states.append([hidden for hidden, _, _ in inputs])
            for entering, leaving in zip(states[-2], states[-1], strict=True):
                totals.add_block(index, entering, leaving)
            if index + 1 >= span:
                for first, last in zip(states[0], states[-1], strict=True):
                    totals.add_span(index + 1 - span, first, last)
    return totals.stats()


def prune_block_by_block(
    checkpoint: Checkpoint,
    ids: torch.Tensor,
    blocks: list[int] | None,
    metric: str,
    amount: int,
    protect_ends: bool,
    shard_bytes: int,
    progress: Progress,
) -> tuple[list[int], dict]:
    """Choose the blocks to remove (``blocks`` as given, else ``amount`` by ``metric``), set the checkpoint's
    writer to the kept blocks' shards and slice its config; returns the removed ids and the score table."""
    executor = checkpoint.blocks
    count = len(executor.blocks)
    where = checkpoint.source.spec
    if blocks is not None:
        remove, table = check_removal(blocks, count, where), {}
    else:
        allowed = allowed_blocks(count, amount, protect_ends)
        stats = boundary_stats_block_by_block(executor, ids, amount, progress)
        remove, table = choose(stats, metric, amount, allowed)
    progress.log(f"removing blocks {', '.join(map(str, remove))} of {count}")
    keep = [i for i in range(count) if i not in remove]
    checkpoint.weights_writer = write_block_by_block(checkpoint, shard_bytes, progress, "writing", keep=keep)
    remove_blocks(checkpoint.model, remove, where)  # the empty model's block list and config follow
    return remove, table
