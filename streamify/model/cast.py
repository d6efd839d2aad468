"""Cast a model's saved floating-point tensors to one dtype, as transformers and diffusers load them."""

from __future__ import annotations

import torch

from streamify.io.config import is_diffusers


def keeps_fp32(model, name: str) -> bool:
    """Whether ``model``'s class keeps the tensor ``name`` in fp32 (transformers' ``_keep_in_fp32_modules``)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(part in name.split(".") for part in keep)


def cast_floats(model, target: torch.dtype) -> list[str]:
    """Cast the saved floating-point tensors of ``model`` to ``target`` (parameters and persistent buffers).

    Returns the names of the tensors its class keeps in fp32 (left as they are).
    """
    kept = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            full = f"{module_name}.{name}" if module_name else name
            if keeps_fp32(model, full):
                kept.append(full)
                continue
            param.data = param.data.to(target)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(target))
    if not is_diffusers(model.config):  # a diffusers config has no dtype entry: its tensors say it
        model.config.dtype = target
    return kept
