"""Counting a model's parameters as its source has them, whatever form the weights are stored in."""

from __future__ import annotations

import math

from torch import nn

PACKED = "weight_packed"  # compressed-tensors' pack-quantized weight: 32 // bits codes per int32


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``: tied tensors once; a quantized weight by its original shape.

    A compressed-tensors module stores its weight as ``weight_packed`` (several
    codes per int32) with ``weight_scale``, ``weight_zero_point`` and
    ``weight_shape``: it counts as ``weight_shape`` parameters, the packing and
    its scales not at all (they are how the weight is stored, not more weights;
    bits per weight come from the bytes on disk).
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        packed = PACKED in own
        for name, tensor in own.items():
            if id(tensor) not in seen and not (packed and name.startswith("weight_")):
                total += tensor.numel()
            seen.add(id(tensor))
        if packed:
            total += math.prod(int(d) for d in module.weight_shape)
    return total
