"""INT4 storage for the recent keys and values of the streaming cache.

Each token's key (and value) vector of each head is cut into groups of
``GROUP`` channels; a group is stored as 4-bit codes (two per byte) with a
16-bit scale and minimum (asymmetric: ``x ≈ code · scale + minimum``): fp16
for an fp16 cache, bf16 otherwise (fp32's range: keys beyond fp16's 65504 stay
finite). That is 4 + 32/GROUP bits per value, 0.31 of an fp16 cache at groups of 32. Tokens
are quantized after the step that produced them has attended to them in full
precision (their own chunk never sees its rounding), and dequantized for each
later step.
"""

from __future__ import annotations

import torch

GROUP = 32
LEVELS = 15


def side_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scales and minimums of a cache in ``dtype``: fp16 for fp16, else bf16 (fp32's range)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = x.shape
    side = side_dtype(x.dtype)
    grouped = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    low = grouped.amin(dim=-1, keepdim=True)
    scale = (grouped.amax(dim=-1, keepdim=True) - low) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(side)
    low = low.to(side)
    codes = torch.clamp(torch.round((grouped - low.float()) / scale.float()), 0, LEVELS).to(torch.uint8)
    codes = codes.reshape(shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale.squeeze(-1), low.squeeze(-1)


def _dequantize(packed, scale, low, dtype: torch.dtype, group: int) -> torch.Tensor:
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // group, group).float()
    return (grouped * scale.float()[..., None] + low.float()[..., None]).reshape(codes.shape).to(dtype)


class Int4Codec:
    """Keys or values ``[batch, heads, tokens, head_dim]`` as INT4 groups: (packed codes, scales, minimums), each
    with the tokens on dim -2, so a store can write and drop them by token."""

    def __init__(self, head_dim: int, dtype: torch.dtype) -> None:
        self.group = GROUP if head_dim % GROUP == 0 else head_dim
        self.dtype = dtype

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Quantize ``x``."""
        return _quantize(x, self.group)

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The values in the cache's dtype."""
        return _dequantize(*parts, self.dtype, self.group)
