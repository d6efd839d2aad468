"""Find the repeated blocks (decoder or encoder layers) of a transformers model."""

from __future__ import annotations

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


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's block list as ``(qualified name, ModuleList)``, or None if there is none.

    The block list is the ModuleList whose children all share one class and
    whose length is the config's layer count (the longest such list otherwise).
    """
    expected = layer_count(getattr(model, "config", None))
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
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
