"""Block scores from hooks on the blocks over calibration tokens, and which blocks they select.

- ``bi`` (ShortGPT): Block Influence ``1 - mean cos(x_i, x_{i+1})``; remove the lowest, anywhere.
- ``angular`` (Gromov et al.): ``arccos(cos(x_l, x_{l+n})) / pi``; remove the contiguous span of n
  blocks that minimises it.
- ``streamline`` (LLM-Streamline): the same most-redundant contiguous span (largest cosine between its
  input and output); the stage replaces it with one trained block.
- ``loss``: held-out loss with a block removed, greedily (remove the cheapest, re-score, repeat); the
  direct measure the others are judged by, and the most expensive.

``x_i`` is the hidden state entering block ``i`` (``x_n`` leaves the last block). The first and last
blocks are never removed unless ``protect_ends`` is off.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from streamify.errors import UsageError
from streamify.model.blocks import block_list
from streamify.model.hooks import recording, skipping
from streamify.progress import SILENT, Progress


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1, 1)


class BoundaryTotals:
    """Sums over calibration tokens of cos(x_i, x_{i+1}) per block and of the angular distance of x_l to
    x_{l+span} per span start; rows are added in the same order however the states are produced."""

    def __init__(self, count: int, span: int) -> None:
        self.cos_sum = torch.zeros(count, dtype=torch.float64)
        self.angle_sum = torch.zeros(count - span + 1, dtype=torch.float64)
        self.tokens = 0

    def add_block(self, index: int, entering: torch.Tensor, leaving: torch.Tensor) -> None:
        """One row's states around block ``index``."""
        self.cos_sum[index] += _cos(entering, leaving).sum().item()

    def add_span(self, start: int, first: torch.Tensor, last: torch.Tensor) -> None:
        """One row's states entering block ``start`` and leaving the span from it."""
        self.angle_sum[start] += (torch.arccos(_cos(first, last)) / math.pi).sum().item()

    def stats(self) -> dict:
        """Per block: mean cos(x_i, x_{i+1}); per span start: mean angular distance of x_l to x_{l+span}."""
        return {"cos": (self.cos_sum / self.tokens).tolist(), "angular_span": (self.angle_sum / self.tokens).tolist()}


@torch.no_grad()
def boundary_stats(model: nn.Module, ids: torch.Tensor, span: int, progress: Progress = SILENT) -> dict:
    """Per block: mean cos(x_i, x_{i+1}); per span start l: mean angular distance of x_l to x_{l+span}."""
    _, blocks = block_list(model, "model")
    count = len(blocks)
    device = next(model.parameters()).device
    totals = BoundaryTotals(count, span)
    for row in progress.track(ids, "scoring blocks"):
        states: list[torch.Tensor] = []
        with recording(blocks, states):
            model(row[None].to(device))
        for i in range(count):
            totals.add_block(i, states[i], states[i + 1])
        for start in range(count - span + 1):
            totals.add_span(start, states[start], states[start + span])
        totals.tokens += row.numel()
    return totals.stats()


@torch.no_grad()
def mean_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token loss over ``ids`` rows."""
    device = next(model.parameters()).device
    losses = []
    for row in ids:
        batch = row[None].to(device)
        losses.append(model(batch, labels=batch).loss.item())
    return sum(losses) / len(losses)


def candidates(count: int, protect_ends: bool) -> list[int]:
    """Block ids that may be removed."""
    return list(range(1, count - 1)) if protect_ends else list(range(count))


def allowed_blocks(count: int, remove: int, protect_ends: bool) -> list[int]:
    """The block ids that may be removed; :class:`UsageError` when fewer than ``remove``."""
    allowed = candidates(count, protect_ends)
    if remove > len(allowed):
        ends = " (the first and last blocks are kept; --no-protect-ends allows them)" if protect_ends else ""
        raise UsageError(f"cannot remove {remove} of {count} blocks{ends}", "remove fewer blocks")
    return allowed


def select_blocks(
    model: nn.Module,
    ids: torch.Tensor,
    metric: str,
    remove: int,
    protect_ends: bool,
    progress: Progress = SILENT,
    stats: Callable[[int], dict] | None = None,
) -> tuple[list[int], dict]:
    """The ``remove`` block ids that ``metric`` picks, and the per-block score table; ``stats(span)`` gives
    :func:`boundary_stats` another way (block by block from the files), the model in memory by default."""
    _, blocks = block_list(model, "model")
    allowed = allowed_blocks(len(blocks), remove, protect_ends)
    if metric == "loss":
        return _greedy_loss(model, blocks, ids, remove, allowed, progress)
    found = stats(remove) if stats is not None else boundary_stats(model, ids, remove, progress)
    return choose(found, metric, remove, allowed)


def choose(stats: dict, metric: str, remove: int, allowed: list[int]) -> tuple[list[int], dict]:
    """The ``remove`` block ids that ``metric`` (``bi``, ``angular``, ``streamline``) picks from
    :func:`boundary_stats`' ``stats``, and the per-block score table."""
    count = len(stats["cos"])
    table = {
        "bi": [1 - c for c in stats["cos"]],
        "angular": [math.acos(max(-1.0, min(1.0, c))) / math.pi for c in stats["cos"]],
    }
    if metric == "bi":
        chosen = sorted(sorted(allowed, key=lambda i: table["bi"][i])[:remove])
        return chosen, table
    starts = [s for s in range(count - remove + 1) if all(i in allowed for i in range(s, s + remove))]
    best = min(starts, key=lambda s: stats["angular_span"][s])
    table["span_angular"] = {str(s): stats["angular_span"][s] for s in starts}
    return list(range(best, best + remove)), table


def _greedy_loss(model, blocks, ids, remove: int, allowed: list[int], progress: Progress) -> tuple[list[int], dict]:
    removed: list[int] = []
    first_round: list[float | None] = [None] * len(blocks)
    for round_index in range(remove):
        scores = {}
        for block in progress.track([b for b in allowed if b not in removed], f"loss scoring, round {round_index + 1}"):
            with skipping(blocks, [*removed, block]):
                scores[block] = mean_loss(model, ids)
        if round_index == 0:
            for block, value in scores.items():
                first_round[block] = value
        removed.append(min(scores, key=scores.get))
    return sorted(removed), {"loss": first_round}
