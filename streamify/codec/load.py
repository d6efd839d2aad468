"""Build a transformers model from an entropy-coded container, eagerly or block by block.

Lazy loading keeps every decoder/encoder block's weights on the meta device and
decodes them in a forward pre-hook, right before the block runs, then drops
them in a forward hook, so peak memory is about the non-block weights plus one
decoded block (the container itself is memory-mapped, not read into memory).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig

from streamify.codec.codec import CorruptWeightsError
from streamify.codec.container import decode_tensors, read_index
from streamify.errors import InputError
from streamify.io.config import instantiate, model_class
from streamify.model.blocks import find_blocks

# compressed-tensors stores a quantized Linear's ``weight`` as these tensors
_QUANTIZED_PARTS = re.compile(r"\.weight_(packed|scale|zero_point|shape|g_idx)$")
_MISMATCH = "the container does not match config.json; re-create the artifact"


def check_matches_config(container: Path, index: dict, config: PretrainedConfig) -> None:
    """:func:`check_matches_model` against the model ``config`` describes (built on the meta device)."""
    with init_empty_weights(include_buffers=False):
        model = instantiate(model_class(config, str(container.parent)), config)
    _tie(model)
    check_matches_model(container, index, model, getattr(config, "quantization_config", None) is not None)


def _tie(model: nn.Module) -> None:
    """Tie shared weights as the model's library does (transformers); diffusers models share none."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def check_matches_model(container: Path, index: dict, model: nn.Module, quantized: bool) -> None:
    """Refuse a container whose tensors are not the model's: one missing, one it lacks, or a shape it does not have.

    Tied weights need one of their names; a ``quantized`` model's Linear weights
    may be stored as compressed-tensors parts (``weight_packed``, ``weight_scale``...).
    """
    entries = index["tensors"]
    shapes = {name: list(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name, entry in entries.items():
        base = _QUANTIZED_PARTS.sub(".weight", name) if quantized else name
        if base not in shapes:
            raise InputError(f"{container}: tensor {name} is not one of the model's", _MISMATCH)
        if base == name and entry["shape"] != shapes[name]:
            raise CorruptWeightsError(
                f"{container}: tensor {name} is stored as {entry['shape']}, the model's is {shapes[name]}", _MISMATCH
            )
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for names in aliases.values():
        if not any(n in entries or (quantized and f"{n}_packed" in entries) for n in names):
            raise CorruptWeightsError(f"{container}: the model's tensor {names[0]} is missing", _MISMATCH)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _to_meta(model: nn.Module, names: list[str]) -> None:
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(owner._parameters[leaf].to("meta"), requires_grad=False)


def load_entropy_model(
    container: Path,
    config,
    cls: type,
    dtype: torch.dtype | str,
    device: torch.device,
    lazy: bool = False,
    threads: int = 0,
) -> nn.Module:
    """A model of class ``cls`` with the container's weights; ``lazy`` decodes blocks on demand."""
    threads = threads or os.cpu_count() or 1
    index = read_index(container)
    with init_empty_weights(include_buffers=False):
        model = instantiate(cls, config)
    _tie(model)
    check_matches_model(container, index, model, quantized=False)
    names = list(index["tensors"])
    target_dtype = None if dtype == "auto" else dtype
    found = find_blocks(model) if lazy else None
    prefix = f"{found[0]}." if found else None
    eager = [n for n in names if prefix is None or not n.startswith(prefix)]

    def place(tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            if target_dtype is not None and value.is_floating_point():
                value = value.to(target_dtype)
            _set_tensor(model, name, value.to(device))

    place(decode_tensors(container, eager, threads, index))
    if found:
        for number, block in enumerate(found[1]):
            block_names = [n for n in names if n.startswith(f"{prefix}{number}.")]
            _hook_block(block, block_names, container, index, threads, place, model)
    _tie(model)
    missing = sorted(
        n for n, p in model.named_parameters() if p.device.type == "meta" and not (prefix and n.startswith(prefix))
    )
    if missing:
        raise InputError(
            f"{container}: {len(missing)} weights are missing, e.g. {', '.join(missing[:5])}",
            "the container does not match config.json; re-create the artifact",
        )
    return model.eval()


def _hook_block(
    block: nn.Module, names: list[str], container: Path, index: dict, threads: int, place, model: nn.Module
) -> None:
    def decode(module, args, kwargs=None):
        place(decode_tensors(container, names, threads, index))

    def drop(module, args, output):
        _to_meta(model, names)

    block.register_forward_pre_hook(decode)
    block.register_forward_hook(drop)
