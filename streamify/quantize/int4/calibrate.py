"""Sequential, block-by-block calibration for weight quantization.

The calibration tokens run through the model once, up to the first block,
and its inputs are kept (with the block-wise executor, :mod:`streamify.model.executor`).
Then, block by block: the block runs on those inputs
with hooks that gather each target linear's input statistics, its linears are
quantized, and the block runs again (now quantized) to make the next block's
inputs. Each block so sees what the already-quantized blocks before it
produce, and peak memory is one block's activations for the calibration set,
not the whole model's.

With a checkpoint folder, the state after every few blocks (the next block's
inputs, the weights of the finished blocks, their INT4 results) is saved, and
a later call with the same folder resumes after the last saved block; the
folder is removed when the stage finishes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from streamify.io.atomic import save_torch
from streamify.model.blocks import block_list
from streamify.model.executor import BlockExecutor
from streamify.progress import SILENT, Progress
from streamify.quantize.int4.grid import Int4Weight

# make_stats(linear) -> an accumulator with add(inputs), fed every input the linear sees in its block;
# solve_block(block, names, stats) -> quantizes those linears in place and returns their INT4 weights;
# ``block`` is the block's module name (None for targets outside the block list); stats[name] is None
# without calibration.
StatsFactory = Callable[[nn.Linear], object]
BlockSolver = Callable[[str | None, list[str], dict[str, object]], dict[str, Int4Weight]]
STATE_NAME = "calibration_state.pt"
CHECKPOINT_EVERY = 4  # blocks between saved calibration states


class WrittenBlocks(Protocol):
    """A block-wise run's progress kept in ``folder``: what its blocks wrote, and the next block's inputs."""

    folder: Path

    def resume(self) -> tuple[int, list | None]:
        """``(next block, its inputs)``; ``(0, None)`` when there is nothing to resume."""

    def save(self, next_block: int, inputs: list | None) -> None:
        """Keep the state after ``next_block`` blocks."""


class _Checkpoints:
    """Saves and restores the calibration state of :func:`quantize_sequentially` in ``folder``."""

    def __init__(self, folder: Path | None, blocks: nn.ModuleList, every: int) -> None:
        self.folder, self.blocks, self.every = folder, blocks, every
        self.saved = 0  # blocks whose weights are on disk

    def resume(self) -> tuple[int, list | None, dict[str, Int4Weight]]:
        """``(next block, its inputs, results so far)``; ``(0, None, {})`` when there is nothing to resume."""
        if self.folder is None or not (self.folder / STATE_NAME).is_file():
            return 0, None, {}
        state = torch.load(self.folder / STATE_NAME, weights_only=True)
        for part in sorted(self.folder.glob("blocks-*.pt")):
            for index, tensors in torch.load(part, weights_only=True).items():
                self.blocks[int(index)].load_state_dict(tensors)
        self.saved = state["next_block"]
        results = {name: Int4Weight(**fields) for name, fields in state["results"].items()}
        return state["next_block"], state["inputs"], results

    def save(self, next_block: int, inputs: list, results: dict[str, Int4Weight]) -> None:
        """Keep the state after ``next_block`` blocks (every ``every`` blocks)."""
        if self.folder is None or inputs is None or next_block % self.every:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        finished = {str(i): self.blocks[i].state_dict() for i in range(self.saved, next_block)}
        part = self.folder / f"blocks-{self.saved:05d}.pt"
        state = {"next_block": next_block, "inputs": inputs, "results": {n: asdict(w) for n, w in results.items()}}
        for path, payload in ((part, finished), (self.folder / STATE_NAME, state)):
            save_torch(payload, path)
        self.saved = next_block

    def clear(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    targets: list[str],
    ids: torch.Tensor | None,
    make_stats: StatsFactory | None,
    solve_block: BlockSolver,
    progress: Progress = SILENT,
    compute_dtype: torch.dtype | None = None,
    checkpoint_dir: Path | None = None,
    executor: BlockExecutor | None = None,
    finish_block: Callable[[int, dict[str, Int4Weight]], None] | None = None,
    written: WrittenBlocks | None = None,
) -> dict[str, Int4Weight]:
    """Quantize the linears named in ``targets`` block by block with ``solve_block``; their INT4 weights.

    With ``ids`` (calibration token blocks ``[n, seq_len]``) and ``make_stats``,
    each target linear gets an accumulator of its inputs in its block; without,
    no forward pass runs (round-to-nearest). Targets outside the block list are
    solved last, without statistics. ``compute_dtype`` (e.g. bf16) runs the
    calibration forward passes under autocast; statistics are kept in fp32.
    With ``checkpoint_dir`` a killed run resumes after its last saved block.
    With an ``executor`` that reads blocks from disk, each block's weights are in
    memory only while it is calibrated; ``finish_block(index, its INT4 weights)``
    is called while they are (to write them), and those results are not kept; ``written`` then keeps the
    next block's inputs every few blocks with what ``finish_block`` wrote, and a later call resumes from it.
    """
    modules = dict(model.named_modules())
    prefix, blocks = block_list(model, type(model).__name__)
    executor = executor or BlockExecutor(model)  # a model in memory: blocks are run, not brought in
    calibrated = ids is not None and make_stats is not None
    checkpoints = _Checkpoints(checkpoint_dir if calibrated else None, blocks, CHECKPOINT_EVERY)
    start, inputs, results = checkpoints.resume() if written is None else (*written.resume(), {})
    if start:
        where = checkpoint_dir if written is None else written.folder
        progress.log(f"calibration: resumed after block {start}/{len(blocks)} from {where}")
    place = next(p.device for p in model.parameters() if p.device.type != "meta")
    autocast = torch.autocast(place.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None)
    if calibrated and inputs is None:
        with autocast:
            inputs = executor.first_inputs(ids, lambda m, row: m(row[None].to(place), use_cache=False))
    with executor.embeddings_away():
        for index in progress.track(range(start, len(blocks)), "quantizing blocks", total=len(blocks) - start):
            with executor.block(index):
                found = _quantize_block(executor, index, targets, modules, inputs, make_stats, solve_block, autocast)
                if inputs is not None and index + 1 < len(blocks):
                    with autocast:
                        inputs = executor.run_block(index, inputs)
                if finish_block is not None:
                    finish_block(index, found)
                    if written is not None and index + 1 < len(blocks) and (index + 1) % CHECKPOINT_EVERY == 0:
                        written.save(index + 1, inputs)
                else:
                    results.update(found)
                    if index + 1 < len(blocks):
                        checkpoints.save(index + 1, inputs, results)
    rest = [name for name in targets if not name.startswith(f"{prefix}.")]  # outside the block list
    if rest:
        results.update(solve_block(None, rest, dict.fromkeys(rest)))
    checkpoints.clear()
    return results


def _quantize_block(executor, index, targets, modules, inputs, make_stats, solve_block, autocast):
    """Gather the input statistics of block ``index``'s targets on ``inputs`` (when calibrating) and solve them."""
    block = f"{executor.prefix}.{index}"
    names = [n for n in targets if n.startswith(f"{block}.")]
    stats: dict[str, object] = dict.fromkeys(names)
    if inputs is not None:
        handles = []
        for name in names:
            stats[name] = make_stats(modules[name])
            handles.append(modules[name].register_forward_hook(lambda m, a, o, acc=stats[name]: acc.add(a[0])))
        try:
            with autocast:
                executor.run_block(index, inputs)
        finally:
            for handle in handles:
                handle.remove()
    return solve_block(block, names, stats)
