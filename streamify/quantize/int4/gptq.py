"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

``H = 2/n Σ x xᵀ`` over calibration inputs; damping adds ``damp · mean(diag H)`` to
the diagonal. Columns go in blocks of a multiple of the group size (lazy batch
updates); a group's scale is taken from the already-updated weights when its
first column comes up. With ``act_order`` the columns are visited by decreasing
``diag H`` and the group scales are fixed up front from the original weights
(static groups), so the artifact keeps the natural column order and needs no
permutation index.
"""

from __future__ import annotations

import torch

from streamify.quantize.int4.grid import Int4Weight, group_scale_zero, quantize_columns
from streamify.quantize.int4.kquant import k_grid, quantize_k_columns, scale_offset


class HessianAccumulator:
    """Running ``2/n Σ x xᵀ`` of a linear layer's inputs (forward hook target)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Fold a batch of inputs ``[..., columns]`` into the running mean."""
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        self.hessian *= self.count / (self.count + n)
        self.count += n
        # in place: a fresh [in, in] product per batch grew the heap by its size each time (glibc, measured)
        self.hessian.addmm_(x.T, x, alpha=2 / self.count)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped Hessian's inverse; damping grows 10× (up to 3 times) if it is not PD.

    At most two ``[in, in]`` matrices besides ``hessian`` live at once (the down projection of a 70B model
    has 28,672 inputs: 3.3 GB a matrix).
    """
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("the calibration inputs hold inf or NaN; calibrate in the model's dtype")
    mean = torch.mean(torch.diag(hessian))
    for attempt in range(4):
        damped = hessian.clone()
        damped.diagonal().add_(damp * 10**attempt * mean)
        try:
            factor = torch.linalg.cholesky(damped)
            del damped
            inverse = torch.cholesky_inverse(factor)
            del factor
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise FloatingPointError(f"the Hessian is not positive definite even with damping {damp * 1000}")


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    damp: float = 0.01,
    act_order: bool = False,
    kquant: bool = False,
) -> Int4Weight:
    """Quantize ``weight`` ``[out, in]`` given the input Hessian ``[in, in]``.

    ``kquant``: on GGUF's Q4_K grid, fixed up front from the original weights
    (static groups of 32, 6-bit scales and minimums per 256), ``group_size`` 32.
    """
    w = weight.detach().float().clone()
    out, columns = w.shape
    dead = torch.diag(hessian) == 0
    h = hessian
    if dead.any():
        h = hessian.clone()
        h[dead, dead] = 1
        w[:, dead] = 0
    groups = columns // group_size
    scales = torch.empty(out, groups, dtype=scale_dtype, device=w.device)
    zeros = torch.zeros(out, groups, dtype=torch.int8, device=w.device)
    order = torch.arange(columns, device=w.device)
    super_scales = sub_scales = offsets = None
    if kquant:
        super_scales, sub_scales = k_grid(w)
        scales, offsets = scale_offset(super_scales, sub_scales)
    if act_order:
        for g in range(groups if not kquant else 0):
            block = w[:, g * group_size : (g + 1) * group_size]
            scales[:, g], zeros[:, g] = group_scale_zero(block, symmetric, scale_dtype)
        order = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, damp)
    del h

    codes = torch.zeros(out, columns, dtype=torch.int8, device=w.device)
    step = group_size * max(1, 128 // group_size)
    for start in range(0, columns, step):
        end = min(start + step, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            original = int(order[start + i])
            group = original // group_size
            if not act_order and not kquant and original % group_size == 0:
                scales[:, group], zeros[:, group] = group_scale_zero(
                    block[:, i : i + group_size], symmetric, scale_dtype
                )
            column = block[:, i : i + 1]
            if kquant:
                code, value = quantize_k_columns(column, scales[:, group], offsets[:, group])
            else:
                code, value = quantize_columns(column, scales[:, group], zeros[:, group])
            codes[:, original] = code[:, 0]
            error = (column[:, 0] - value[:, 0]) / hblock[i, i]
            block[:, i:] -= error[:, None] @ hblock[i : i + 1, i:]
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return Int4Weight(codes, scales, zeros, group_size, super_scales, sub_scales)
