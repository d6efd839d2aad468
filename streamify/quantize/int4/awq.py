"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling input channels.

For linears that share one input and one preceding op (the groups the
architecture's adapter in :mod:`streamify.arch` declares: for a Llama, q/k/v
after the attention norm, gate/up after the MLP norm, o after v, down after
up), the per-channel scale ``s = mean|x|^α`` is searched over α in [0, 1): the weights
are multiplied by ``s`` before round-to-nearest quantization and the input
divided by ``s``, and the α whose quantized output is closest to the float
output on the calibration inputs wins. The division is folded into the
preceding op (the norm's weight, or the rows of the preceding linear), so the
artifact is a plain model with plain INT4 linears. Weight clipping search, the
second half of the AWQ paper, is not done here.
"""

from __future__ import annotations

import torch
from torch import nn

from streamify.arch import ScaleGroup
from streamify.errors import InputError
from streamify.quantize.int4.grid import rtn

GRID = 20
SAMPLE_ROWS = 4096  # input rows of a linear kept for the scale search
GQA_SKIP = "grouped-query attention: v's outputs are repeated before o, no 1:1 channel to fold"


class InputSample:
    """Up to ``limit`` input rows of a linear layer (forward hook target)."""

    def __init__(self, limit: int = SAMPLE_ROWS) -> None:
        self.rows: list[torch.Tensor] = []
        self.limit = limit
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Keep rows of ``inputs`` ``[..., columns]`` until ``limit`` are held."""
        if self.count < self.limit:
            rows = inputs.reshape(-1, inputs.shape[-1])[: self.limit - self.count].float()
            self.rows.append(rows)
            self.count += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        """The kept rows ``[n, columns]``."""
        return torch.cat(self.rows)


def _fold(previous: nn.Module, scale: torch.Tensor) -> None:
    """Divide the output channels of ``previous`` (a norm or a linear) by ``scale``, bias included."""
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scale[:, None].to(previous.weight.dtype))
    elif "Gemma" in type(previous).__name__:  # Gemma's RMSNorm multiplies by (1 + weight)
        previous.weight.copy_(((1 + previous.weight.float()) / scale - 1).to(previous.weight.dtype))
    else:
        previous.weight.div_(scale.to(previous.weight.dtype))
    bias = getattr(previous, "bias", None)
    if isinstance(bias, torch.Tensor):  # a linear's or a LayerNorm's
        bias.div_(scale.to(bias.dtype))


def search_scale(
    linears: list[nn.Linear], inputs: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    """The input-channel scale (and its α) minimising the group's output error after RTN."""
    # the mean squared output error of a weight change D is tr(D G Dᵀ) / outputs, with G = XᵀX / rows:
    # a product with the Gram matrix instead of with every input row
    gram = inputs.T @ inputs / inputs.shape[0]
    magnitude = inputs.abs().mean(dim=0).clamp(min=1e-8)
    best, best_alpha, best_error = torch.ones_like(magnitude), 0.0, float("inf")
    for step in range(GRID):
        alpha = step / GRID
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = 0.0
        for linear in linears:
            q = rtn(linear.weight.float() * scale, group_size, symmetric, scale_dtype)
            change = q.dequantize(torch.float32) / scale - linear.weight.float()
            error += ((change @ gram) * change).sum().item() / change.shape[0]
        if error < best_error:
            best, best_alpha, best_error = scale, alpha, error
    return best, best_alpha


@torch.no_grad()
def fold_scales(
    modules: dict[str, nn.Module],
    block: str,
    groups: tuple[ScaleGroup, ...],
    names: list[str],
    samples: dict[str, InputSample | None],
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> tuple[dict[str, float], dict[str, str]]:
    """Search and fold the scale of every group of the block at ``block`` (the float function is unchanged).

    Returns ``(α per group, groups not scaled and why)``. A group whose modules
    the block does not have is an error (exit 3): the adapter does not describe
    this model, and quietly skipping it would be RTN under AWQ's name.
    """
    alphas, skipped = {}, {}
    for group in groups:
        previous = modules.get(f"{block}.{group.previous}")
        members = [f"{block}.{name}" for name in group.linears]
        missing = [n for n in [f"{block}.{group.previous}", *members] if n not in modules]
        if missing or not isinstance(previous, nn.Module):
            raise InputError(
                f"AWQ: {missing[0] if missing else group.previous} is not in the model, "
                "so the architecture's scale groups do not describe it",
                "fix the adapter in streamify/arch for this architecture, or use method gptq or rtn",
            )
        if not all(m in names for m in members):
            skipped[group.previous] = "not all of its linears are quantization targets"
            continue
        if any(samples[m] is None or samples[m].count == 0 for m in members):
            raise InputError(f"AWQ: no calibration inputs reached {members[0]}", "check the calibration data")
        linears = [modules[m] for m in members]
        if isinstance(previous, nn.Linear) and previous.out_features != linears[0].in_features:
            skipped[group.previous] = GQA_SKIP
            continue
        scale, alpha = search_scale(linears, samples[members[0]].matrix(), group_size, symmetric, scale_dtype)
        _fold(previous, scale)
        for linear in linears:
            linear.weight.mul_(scale.to(linear.weight.dtype))
        alphas[group.previous] = alpha
    return alphas, skipped
