"""Model surgery: remove whole blocks and leave a clean, stock transformers checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from streamify.errors import UsageError
from streamify.model.blocks import LAYER_COUNT_KEYS, block_list
from streamify.runtime.spec import CONFIG_KEY


def check_removal(indices: list[int], count: int, where: str) -> list[int]:
    """Sorted unique block ids to remove; :class:`UsageError` for ids out of range or removing every block."""
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise UsageError(
            f"{where}: block {bad[0]} is out of range; the model has {count} blocks (0-{count - 1})",
            "give block ids between 0 and the block count minus one",
        )
    unique = sorted(set(indices))
    if len(unique) >= count:
        raise UsageError(f"{where}: removing {len(unique)} of {count} blocks leaves none", "keep at least one block")
    return unique


def remove_blocks(model: nn.Module, remove: list[int], where: str = "model") -> nn.Module:
    """Remove the blocks ``remove`` in place; renumber ``layer_idx`` and slice every per-layer config list."""
    path, blocks = block_list(model, where)
    count = len(blocks)
    remove = check_removal(remove, count, where)
    keep = [i for i in range(count) if i not in remove]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.ModuleList([blocks[i] for i in keep]))
    for new_index, block in enumerate(model.get_submodule(path)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    _slice_config(model.config, keep, count)
    return model


def _slice_config(config, keep: list[int], count: int) -> None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int) and getattr(config, key) == count:
            setattr(config, key, len(keep))
    for key, value in list(vars(config).items()):
        if isinstance(value, list | tuple) and len(value) == count and not key.startswith("_"):
            setattr(config, key, type(value)(value[i] for i in keep))
    streaming = getattr(config, CONFIG_KEY, None)
    if isinstance(streaming, dict) and len(streaming.get("layer_types", [])) == count:
        types = [streaming["layer_types"][i] for i in keep]
        full = [i for i, kind in enumerate(types) if kind == "full"]
        setattr(config, CONFIG_KEY, {**streaming, "layer_types": types, "full_layers": full})


@torch.no_grad()
def average_into_neighbours(model: nn.Module, remove: list[int]) -> list[int]:
    """Re-initialise each kept block next to a removed span as the mean of itself and that span's blocks.

    Call before :func:`remove_blocks`. The block before a span absorbs it (the
    block after, when the span starts at block 0). Returns the re-initialised ids.
    """
    _, blocks = block_list(model, "model")
    spans, current = [], []
    for index in sorted(remove):
        if current and index != current[-1] + 1:
            spans.append(current)
            current = []
        current.append(index)
    if current:
        spans.append(current)
    changed = []
    for span in spans:
        target = span[0] - 1 if span[0] > 0 else span[-1] + 1
        group = [blocks[i] for i in span] + [blocks[target]]
        states = [b.state_dict() for b in group]
        merged = {
            name: torch.stack([s[name].float() for s in states]).mean(0).to(tensor.dtype)
            if tensor.is_floating_point()
            else tensor
            for name, tensor in states[-1].items()
        }
        blocks[target].load_state_dict(merged)
        changed.append(target)
    return changed
