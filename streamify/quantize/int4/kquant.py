"""GGUF's Q4_K grid: super-blocks of 256 weights, each 8 sub-blocks of 32 with 6-bit scales and minimums.

A weight of sub-block ``s`` is ``q · (d · sc[s]) − dmin · m[s]`` with ``q`` in
[0, 15]; ``d`` and ``dmin`` are fp16, one pair per super-block, ``sc`` and ``m``
6-bit integers per sub-block (144 bytes per 256 weights: 4.5 bits a weight).
Every sub-block's range is widened to include 0 (so ``m ≥ 0``), its float
scale ``(max − min) / 15`` and minimum ``−min`` are put on the 6-bit grids of
the super-block, and codes are rounded on the result: the grid the file
stores is the grid GPTQ or RTN quantized against. Our codes are ``q − 8``
(the signed INT4 codes of :mod:`streamify.quantize.int4.grid`).
"""

from __future__ import annotations

import numpy as np
import torch

SUPER, SUB = 256, 32
SIX_BITS = 63


def k_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(super_scales [out, n/256, 2] fp16: d, dmin; sub_scales [out, n/32, 2] uint8: sc, m)`` of ``weight``."""
    out, columns = weight.shape
    sub = weight.detach().float().reshape(out, columns // SUB, SUB)
    low = sub.amin(dim=-1).clamp(max=0)
    high = sub.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / 15).reshape(out, columns // SUPER, SUPER // SUB)
    minimum = (-low).reshape(scale.shape)
    d = (scale.amax(dim=-1) / SIX_BITS).to(torch.float16)
    dmin = (minimum.amax(dim=-1) / SIX_BITS).to(torch.float16)
    sc = _six_bits(scale, d, keep_nonzero=True)
    m = _six_bits(minimum, dmin, keep_nonzero=False)
    return torch.stack([d, dmin], dim=-1), torch.stack([sc, m], dim=-1).reshape(out, columns // SUB, 2)


def _six_bits(values: torch.Tensor, step: torch.Tensor, keep_nonzero: bool) -> torch.Tensor:
    """``values`` ``[out, blocks, 8]`` as multiples of ``step`` ``[out, blocks]`` in [0, 63] (uint8)."""
    step = step.float()[..., None]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    units = torch.round(values / safe).clamp(0, SIX_BITS)
    if keep_nonzero:  # a sub-block with any range keeps a non-zero scale
        units = torch.where(values > 0, units.clamp(min=1), units)
    return torch.where(step > 0, units, torch.zeros_like(units)).to(torch.uint8)


def scale_offset(super_scales: torch.Tensor, sub_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block ``(d·sc, dmin·m)`` ``[out, n/32]`` in fp32, computed as llama.cpp and gguf do."""
    per = SUPER // SUB
    d = super_scales[..., 0].float().repeat_interleave(per, dim=1)
    dmin = super_scales[..., 1].float().repeat_interleave(per, dim=1)
    return d * sub_scales[..., 0].float(), dmin * sub_scales[..., 1].float()


def quantize_k_columns(
    columns: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``q − 8``, int8) and fp32 values of sub-block columns ``[out, k]``; scale, offset ``[out]``."""
    scale_col, offset_col = scale[:, None], offset[:, None]
    safe = torch.where(scale_col > 0, scale_col, torch.ones_like(scale_col))
    q = torch.clamp(torch.round((columns.float() + offset_col) / safe), 0, 15)
    q = torch.where(scale_col > 0, q, torch.zeros_like(q))
    return (q - 8).to(torch.int8), q * scale_col - offset_col


def dequantize_k(codes: torch.Tensor, super_scales: torch.Tensor, sub_scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``q · d·sc − dmin·m`` the codes stand for."""
    scale, offset = scale_offset(super_scales, sub_scales)
    q = (codes.to(torch.int16) + 8).float()
    return q * scale.repeat_interleave(SUB, dim=1) - offset.repeat_interleave(SUB, dim=1)


def pack_q4_k(codes: torch.Tensor, super_scales: torch.Tensor, sub_scales: torch.Tensor) -> np.ndarray:
    """GGUF Q4_K blocks as bytes ``[out, n / 256 * 144]``: d, dmin, the 12 packed scale bytes, the nibbles."""
    out, columns = codes.shape
    blocks = columns // SUPER
    q = (codes.cpu().to(torch.int16) + 8).to(torch.uint8).reshape(out, blocks, 8, SUB).numpy()
    nibbles = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(out, blocks, 128)  # sub-blocks 2j, 2j+1 share a byte
    sc, m = (sub_scales[..., i].cpu().reshape(out, blocks, 8).numpy() for i in (0, 1))
    packed = np.empty((out, blocks, 12), dtype=np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    halves = super_scales.cpu().contiguous().numpy().view(np.uint8).reshape(out, blocks, 4)  # d then dmin, fp16 each
    return np.ascontiguousarray(np.concatenate([halves, packed, nibbles], axis=-1).reshape(out, -1))
