"""The INT4 grid: group-wise scales and zero points, quantize and dequantize.

Codes are signed 4-bit integers in [-8, 7]; a weight is ``(code - zero) * scale``
with one scale (and zero point) per ``group_size`` consecutive input columns of
a row. Symmetric: ``zero = 0`` and ``scale = max|w| / 7.5`` (the largest weight
lands half a step inside the grid). Asymmetric: ``scale = (max - min) / 15``
and ``zero`` puts ``min`` on code -8. This is compressed-tensors' convention
(``weight_scale``, ``weight_zero_point``), and Q4_0 / Q4_1 of GGUF are the same
grid with ``code + 8`` stored (see :mod:`streamify.quantize.int4.gguf`).

Scales are rounded to the nearest value of ``scale_dtype``, the dtype they are
stored in, as soon as they are made, and dequantization multiplies in that
dtype, so the in-memory model, the packed artifact and its reload agree bit for
bit. Nearest, not up: rounding every scale up makes the weights that fall
halfway between two codes (frequent in weights that were on a 4-bit grid
before, such as a dequantized GGUF) all round towards zero, a bias measured as
+7% perplexity on the built-in model with fp16 scales (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamify.quantize.int4.kquant import SUB, dequantize_k, k_grid, quantize_k_columns, scale_offset

QMIN, QMAX = -8, 7


@dataclass
class Int4Weight:
    """One quantized weight: codes ``[out, in]`` (int8), scale and zero ``[out, in // group_size]``.

    On GGUF's Q4_K grid (:mod:`streamify.quantize.int4.kquant`) ``super_scales``
    and ``sub_scales`` hold it; ``scale`` is then the fp32 ``d·sc`` per
    sub-block and ``zero`` unused (0).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    super_scales: torch.Tensor | None = None
    sub_scales: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the codes stand for, in ``dtype``."""
        if self.super_scales is not None:
            return dequantize_k(self.codes, self.super_scales, self.sub_scales).to(dtype)
        return dequantize(self.codes, self.scale, self.zero, self.group_size).to(dtype)


def group_scale_zero(
    block: torch.Tensor, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[out]`` of one group of columns ``block`` ``[out, group]``."""
    block = block.float()
    if symmetric:
        scale = block.abs().amax(dim=1) / ((QMAX - QMIN) / 2)
        scale = _stored(_nonzero(scale), scale_dtype)
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    low = block.amin(dim=1).clamp(max=0)
    high = block.amax(dim=1).clamp(min=0)
    scale = _stored(_nonzero((high - low) / (QMAX - QMIN)), scale_dtype)
    zero = (QMIN - torch.round(low / scale.float())).clamp(QMIN, QMAX).to(torch.int8)
    return scale, zero


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to the nearest ``dtype`` value (the largest weight may then clamp by a hair), never 0."""
    cast = scale.to(dtype)
    return torch.where(cast > 0, cast, torch.full_like(cast, torch.finfo(dtype).smallest_normal))


def quantize_columns(
    columns: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8) and dequantized values (fp32) of ``columns`` ``[out, k]`` under one group's scale/zero."""
    scale_col, zero_col = scale.float()[:, None], zero.float()[:, None]
    codes = torch.clamp(torch.round(columns.float() / scale_col) + zero_col, QMIN, QMAX)
    values = ((codes - zero_col).to(scale.dtype) * scale[:, None]).float()
    return codes.to(torch.int8), values


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, computed in the scale's dtype (as compressed-tensors does)."""
    scale_full = scale.repeat_interleave(group_size, dim=1)
    zero_full = zero.repeat_interleave(group_size, dim=1)
    return (codes.to(torch.int16) - zero_full.to(torch.int16)).to(scale.dtype) * scale_full


def rtn(weight: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> Int4Weight:
    """Round-to-nearest: every group scaled by its own min/max, no calibration."""
    out, columns = weight.shape
    grouped = weight.float().reshape(out, columns // group_size, group_size)
    scales, zeros, codes = [], [], []
    for g in range(grouped.shape[1]):
        scale, zero = group_scale_zero(grouped[:, g], symmetric, scale_dtype)
        code, _ = quantize_columns(grouped[:, g], scale, zero)
        scales.append(scale)
        zeros.append(zero)
        codes.append(code)
    return Int4Weight(torch.cat(codes, 1), torch.stack(scales, 1), torch.stack(zeros, 1), group_size)


def rtn_k(weight: torch.Tensor) -> Int4Weight:
    """Round-to-nearest on GGUF's Q4_K grid (256-weight super-blocks, 6-bit sub-block scales and minimums)."""
    super_scales, sub_scales = k_grid(weight)
    scale, offset = scale_offset(super_scales, sub_scales)
    grouped = weight.float().reshape(weight.shape[0], -1, SUB)
    codes = [quantize_k_columns(grouped[:, g], scale[:, g], offset[:, g])[0] for g in range(grouped.shape[1])]
    zero = torch.zeros_like(scale, dtype=torch.int8)
    return Int4Weight(torch.cat(codes, 1), scale, zero, SUB, super_scales, sub_scales)


def valid_group_sizes(columns: int, candidates=(32, 64, 128, 256)) -> list[int]:
    """Group sizes among ``candidates`` that divide ``columns``."""
    return [g for g in candidates if columns % g == 0]
