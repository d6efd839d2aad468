"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling input channels.

For linears that share one input and one preceding op (q/k/v after the
attention norm, gate/up after the MLP norm, o after v, down after up), the
per-channel scale ``s = mean|x|^α`` is searched over α in [0, 1): the weights
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

from streamify.quantize.int4_grid import Int4Weight, rtn

# (preceding op, linears that read its output) within one decoder block, by Llama-family names.
GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
GRID = 20


class InputSample:
    """Up to ``limit`` input rows of a linear layer (forward hook target)."""

    def __init__(self, limit: int = 4096) -> None:
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
    """Divide the output channels of ``previous`` (a norm or a linear) by ``scale``."""
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scale[:, None].to(previous.weight.dtype))
        if previous.bias is not None:
            previous.bias.div_(scale.to(previous.bias.dtype))
    elif "Gemma" in type(previous).__name__:  # Gemma's RMSNorm multiplies by (1 + weight)
        previous.weight.copy_(((1 + previous.weight.float()) / scale - 1).to(previous.weight.dtype))
    else:
        previous.weight.div_(scale.to(previous.weight.dtype))


def search_scale(
    linears: list[nn.Linear], inputs: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    """The input-channel scale (and its α) minimising the group's output error after RTN."""
    reference = [inputs @ linear.weight.float().T for linear in linears]
    magnitude = inputs.abs().mean(dim=0).clamp(min=1e-8)
    best, best_alpha, best_error = torch.ones_like(magnitude), 0.0, float("inf")
    for step in range(GRID):
        alpha = step / GRID
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = 0.0
        for linear, target in zip(linears, reference, strict=True):
            q = rtn(linear.weight.float() * scale, group_size, symmetric, scale_dtype)
            error += (inputs @ (q.dequantize(torch.float32) / scale).T - target).pow(2).mean().item()
        if error < best_error:
            best, best_alpha, best_error = scale, alpha, error
    return best, best_alpha


@torch.no_grad()
def awq_block(
    modules: dict[str, nn.Module],
    block: str | None,
    names: list[str],
    samples: dict[str, InputSample | None],
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> tuple[dict[str, Int4Weight], dict[str, float]]:
    """Scale, fold and quantize the ``names`` of the block at ``block``; their INT4 weights and α per group."""
    alphas = {}
    for previous_name, group in GROUPS if block is not None else ():
        previous = modules.get(f"{block}.{previous_name}")
        members = [f"{block}.{g}" for g in group]
        if previous is None or not all(m in names and samples[m] is not None for m in members):
            continue
        linears = [modules[m] for m in members]
        if isinstance(previous, nn.Linear) and previous.out_features != linears[0].in_features:
            continue  # grouped-query attention: v's outputs are repeated before o, no 1:1 channel to fold
        scale, alpha = search_scale(linears, samples[members[0]].matrix(), group_size, symmetric, scale_dtype)
        _fold(previous, scale)
        for linear in linears:
            linear.weight.mul_(scale.to(linear.weight.dtype))
        alphas[previous_name] = alpha
    results = {name: rtn(modules[name].weight, group_size, symmetric, scale_dtype) for name in names}
    return results, alphas
