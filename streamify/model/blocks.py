"""Find the repeated blocks (decoder or encoder layers) of a transformers model."""

from __future__ import annotations

import torch
from torch import nn

from streamify.errors import InputError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers")


def layer_count(config) -> int | None:
    """Number of blocks the config declares, if it declares one."""
    for key in LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's blocks, as transformers declares them (``_no_split_modules``).

    Read from every transformers model inside ``model``, so a wrapper (peft) has its model's.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's block list as ``(qualified name, ModuleList)``, or None if there is none.

    The block list is a ModuleList of the blocks transformers declares for the
    model (:func:`block_classes`; hybrids mix two kinds), the one whose length is
    the config's layer count (the longest such list otherwise). A list of
    experts or heads is never taken for it.
    """
    expected = layer_count(getattr(model, "config", None))
    classes = block_classes(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(type(m).__name__ in classes for m in module)
    ]
    exact = [c for c in candidates if len(c[1]) == expected]
    pool = exact or candidates
    return max(pool, key=lambda c: len(c[1])) if pool else None


def block_list(model: nn.Module, where: str) -> tuple[str, nn.ModuleList]:
    """The model's block list; :class:`InputError` (exit 3) when it has none."""
    found = find_blocks(model)
    if found is None:
        raise InputError(
            f"{where}: no list of repeated blocks found in {type(model).__name__}",
            "depth pruning needs a decoder or encoder with a block list (model.layers, transformer.h, ...)",
        )
    return found


def block_tensors(model: nn.Module, prefix: str, index: int | None) -> dict[str, torch.Tensor]:
    """The saved tensors of block ``index`` of the block list at ``prefix``, or (None) of everything outside it."""
    if index is not None:
        return model.get_submodule(f"{prefix}.{index}").state_dict(prefix=f"{prefix}.{index}.", keep_vars=True)
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(f"{prefix}.")}
