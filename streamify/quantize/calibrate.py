"""Sequential, block-by-block calibration for weight quantization.

The calibration tokens run through the model once, up to the first block,
and its inputs are kept. Then, block by block: the block runs on those inputs
with hooks that gather each target linear's input statistics, its linears are
quantized, and the block runs again (now quantized) to make the next block's
inputs. Each block so sees what the already-quantized blocks before it
produce, and peak memory is one block's activations for the calibration set,
not the whole model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from streamify.model.blocks import block_list
from streamify.progress import SILENT, Progress

# make_stats(linear) -> an accumulator with add(inputs), fed every input the linear sees in its block;
# solve_block(block, names, stats) -> quantizes those linears in place; ``block`` is the block's module name
# (None for targets outside the block list); stats[name] is None without calibration.
StatsFactory = Callable[[nn.Linear], object]
BlockSolver = Callable[[str | None, list[str], dict[str, object]], None]


class _Stop(Exception):
    """Raised by the hook on the first block: the rest of the model need not run."""


def _first_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> list[tuple]:
    device = next(model.parameters()).device
    captured: list[tuple] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, args[1:], kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in ids:
            with contextlib.suppress(_Stop):
                model(row[None].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    outputs = []
    for hidden, args, kwargs in inputs:
        out = block(hidden, *args, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, args, kwargs))
    return outputs


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    targets: list[str],
    ids: torch.Tensor | None,
    make_stats: StatsFactory | None,
    solve_block: BlockSolver,
    progress: Progress = SILENT,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Quantize the linears named in ``targets`` block by block with ``solve_block``.

    With ``ids`` (calibration token blocks ``[n, seq_len]``) and ``make_stats``,
    each target linear gets an accumulator of its inputs in its block; without,
    no forward pass runs (round-to-nearest). Targets outside the block list are
    solved last, without statistics. ``compute_dtype`` (e.g. bf16) runs the
    calibration forward passes under autocast; statistics are kept in fp32.
    """
    modules = dict(model.named_modules())
    prefix, blocks = block_list(model, type(model).__name__)
    calibrated = ids is not None and make_stats is not None
    device = next(model.parameters()).device.type
    autocast = torch.autocast(device, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None)
    with autocast:
        inputs = _first_block_inputs(model, blocks, ids) if calibrated else None
    done: set[str] = set()
    for index in progress.track(range(len(blocks)), "quantizing blocks", total=len(blocks)):
        inside = f"{prefix}.{index}."
        names = [n for n in targets if n.startswith(inside)]
        stats: dict[str, object] = dict.fromkeys(names)
        if inputs is not None:
            handles = []
            for name in names:
                stats[name] = make_stats(modules[name])
                handles.append(modules[name].register_forward_hook(lambda m, a, o, acc=stats[name]: acc.add(a[0])))
            try:
                with autocast:
                    _run_block(blocks[index], inputs)
            finally:
                for handle in handles:
                    handle.remove()
        solve_block(f"{prefix}.{index}", names, stats)
        done.update(names)
        if inputs is not None and index + 1 < len(blocks):
            with autocast:
                inputs = _run_block(blocks[index], inputs)
    rest = [name for name in targets if name not in done]
    if rest:
        solve_block(None, rest, dict.fromkeys(rest))
