"""Write an INT4 artifact in compressed-tensors' ``pack-quantized`` format, through that library.

The quantization config is attached to a copy of the model, each target's
``weight_scale`` / ``weight_zero_point`` is set to our solver's, and the
library packs the codes (eight 4-bit values per int32) and writes the
``quantization_config`` that transformers and vLLM read. The copy is saved
right after compressing: a forward pass on a compressed model silently
decompresses it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from streamify.io.checkpoint import Checkpoint
from streamify.quantize.int4.grid import Int4Weight

FORMAT = "pack-quantized"


def quantization_config(group_size: int, symmetric: bool, ignore: list[str]):
    """The compressed-tensors config of W4A16 group quantization of every Linear but ``ignore``."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    return QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=ignore,
        format=FORMAT,
        quantization_status=QuantizationStatus.FROZEN,
    )


@torch.no_grad()
def write_compressed_tensors(
    checkpoint: Checkpoint, quantized: dict[str, Int4Weight], symmetric: bool, folder: Path
) -> None:
    """Save ``checkpoint``'s model with the ``quantized`` linears packed, plus its config, into ``folder``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model = copy.deepcopy(checkpoint.model)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    group_size = next(iter(quantized.values())).group_size
    config = quantization_config(group_size, symmetric, [n for n in linears if n not in quantized])
    apply_quantization_config(model, config, show_progress=False)
    modules = dict(model.named_modules())
    for name, weight in quantized.items():
        module = modules[name]
        module.weight_scale.copy_(weight.scale.to(module.weight_scale.dtype))
        module.weight_zero_point.copy_(weight.zero.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, FORMAT)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
