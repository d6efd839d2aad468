"""Build a transformers model from an entropy-coded container, eagerly or block by block.

Lazy loading goes through the block-wise executor (:mod:`streamify.model.executor`):
every block's weights stay on the meta device and are decoded right before the
block runs, then dropped, so peak memory is about the non-block weights plus
one decoded block (the container itself is memory-mapped, not read into memory).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from streamify.codec.codec import CorruptWeightsError
from streamify.codec.container import CodedFolder
from streamify.errors import InputError
from streamify.io.config import model_class
from streamify.model.blocks import find_blocks
from streamify.model.executor import check_complete, empty_model, lazy_model, place_tensors, tie_shared
from streamify.quantize.int4.dequantized import QUANTIZED_PART

_MISMATCH = "the container does not match config.json; re-create the artifact"


def check_matches_config(where: Path, index: dict, config: PretrainedConfig) -> None:
    """:func:`check_matches_model` against the model ``config`` describes (built on the meta device)."""
    model = empty_model(model_class(config, str(where)), config)
    tie_shared(model)
    check_matches_model(where, index, model, getattr(config, "quantization_config", None) is not None)


def check_matches_model(container: Path, index: dict, model: nn.Module, quantized: bool) -> None:
    """Refuse a container whose tensors are not the model's: one missing, one it lacks, or a shape it does not have.

    Tied weights need one of their names; a ``quantized`` model's Linear weights
    may be stored as compressed-tensors parts (``weight_packed``, ``weight_scale``...).
    """
    entries = index["tensors"]
    shapes = {name: list(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name, entry in entries.items():
        base = QUANTIZED_PART.sub(".weight", name) if quantized else name
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


class ContainerWeights:
    """The tensors of an artifact's containers, decoded on demand (a
    :class:`~streamify.model.executor.WeightSource`)."""

    def __init__(self, reader: CodedFolder, threads: int) -> None:
        self.reader, self.threads = reader, threads

    def names(self) -> list[str]:
        return list(self.reader.index["tensors"])

    def load(self, names: list[str], into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return self.reader.decode(names, self.threads, into)

    def layout(self, names: list[str]) -> dict[str, tuple[list[int], torch.dtype]]:
        """Shape and dtype of the tensors among ``names`` that :meth:`load` can decode into buffers."""
        return self.reader.coded_layout(names)


def load_entropy_model(
    containers: list[Path],
    config,
    cls: type,
    dtype: torch.dtype | str,
    device: torch.device,
    lazy: bool = False,
    threads: int = 0,
) -> nn.Module:
    """A model of class ``cls`` with the containers' weights; ``lazy`` decodes blocks on demand."""
    threads = threads or os.cpu_count() or 1
    reader = CodedFolder(containers)
    where = containers[0] if len(containers) == 1 else containers[0].parent
    model = empty_model(cls, config)
    tie_shared(model)
    check_matches_model(where, reader.index, model, quantized=False)
    target_dtype = None if dtype == "auto" else dtype
    weights = ContainerWeights(reader, threads)
    if lazy and find_blocks(model):
        return lazy_model(model, weights, device, target_dtype, str(where))
    place_tensors(model, weights.load(weights.names()), device, target_dtype)
    tie_shared(model)
    check_complete(model, str(where))
    return model.eval()
