"""Model surgery: remove whole blocks and leave a clean, stock transformers checkpoint."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from streamify.arch import arch_for
from streamify.errors import UsageError
from streamify.model.blocks import LAYER_COUNT_KEYS, block_list, layer_count
from streamify.runtime.spec import CONFIG_KEY, read_spec


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
    """Remove the blocks ``remove`` in place; renumber ``layer_idx`` and slice every per-layer config entry.

    A streaming model keeps streaming, under its spec with the removed layers' entries gone.
    """
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
    if getattr(model, "streamify_controller", None) is not None:  # the runtime follows the sliced spec
        from streamify.runtime.attention import enable_streaming

        enable_streaming(model, read_spec(model.config))
    return model


def _slice_config(config, keep: list[int], count: int) -> None:
    """Make every per-layer entry of ``config`` (and of a nested config with the same layers) describe ``keep``.

    Lists with one entry per layer are sliced; the keys the family's adapter
    (:mod:`streamify.arch`) declares as layer indices are renumbered, and those
    holding a number of layers (``max_window_layers``) count the kept layers below it.
    """
    arch = arch_for(getattr(config, "model_type", None))
    index_keys = arch.layer_index_keys if arch else ()
    for key in index_keys:
        value = getattr(config, key, None)
        if isinstance(value, list | tuple):
            setattr(config, key, type(value)(keep.index(i) for i in value if i in keep))
    for key in arch.layer_count_keys if arch else ():
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, sum(1 for i in keep if i < value))
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int) and getattr(config, key) == count:
            setattr(config, key, len(keep))
    for key, value in list(vars(config).items()):
        if key.startswith("_") or key in index_keys:
            continue
        if isinstance(value, PretrainedConfig) and layer_count(value) == count:  # e.g. a VLM's text_config
            _slice_config(value, keep, count)
        elif isinstance(value, list | tuple) and len(value) == count:
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
