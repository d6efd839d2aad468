"""Read an INT4 (compressed-tensors ``pack-quantized``) checkpoint as float weights, module by module.

Lazy loading of an INT4 artifact goes through it: the block-wise executor asks
for a block's ``*.weight`` tensors, and :class:`DequantizedWeights` reads that
module's stored parts (``weight_packed``, ``weight_scale``, ``weight_shape``,
``weight_zero_point``) from the files or the entropy-coded container and
dequantizes them with compressed-tensors' own compressor, as transformers does
when it loads the checkpoint whole. Only the running blocks are ever dequantized.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from streamify.errors import UsageError
from streamify.model.executor import WeightSource

_PART = re.compile(r"^(?P<module>.+)\.weight_(?P<part>packed|scale|shape|zero_point|g_idx)$")
_FORMAT = "pack-quantized"


def weight_scheme(quantization_config: Any, where: str):
    """The one compressed-tensors weight scheme of a ``pack-quantized`` config (UsageError for anything else)."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(quantization_config)
    groups = list(config.config_groups.values())
    formats = {group.format or config.format for group in groups}
    if len(groups) != 1 or formats != {_FORMAT} or groups[0].weights is None:
        raise UsageError(
            f"{where}: --lazy dequantizes one pack-quantized INT weight scheme; this checkpoint has "
            f"{len(groups)} quantization group(s) in format(s) {', '.join(sorted(map(str, formats)))}",
            "load it without --lazy",
        )
    return groups[0]


class DequantizedWeights:
    """A :class:`~streamify.model.executor.WeightSource` that gives a quantized module's ``weight`` in float,
    dequantized from the parts ``source`` stores; other tensors pass through.

    ``dtype`` (None: the scales' dtype) is what the scales are cast to before dequantizing, so the weight is
    computed in the dtype the model runs in, as transformers computes it. ``shapes`` are the model's tensor
    shapes: with them the source tells the executor what buffers to decode into (``layout``), so a block's
    weights land in memory the process already holds instead of fresh pages.
    """

    def __init__(
        self, source: WeightSource, scheme: Any, dtype: torch.dtype | None, shapes: dict[str, torch.Size], where: str
    ) -> None:
        self.source, self.scheme, self.shapes = source, scheme, shapes
        self.parts: dict[str, list[str]] = {}  # "<module>.weight" -> its stored parts
        self.plain: list[str] = []
        for name in source.names():
            match = _PART.match(name)
            if match is None:
                self.plain.append(name)
                continue
            if match["part"] == "g_idx":
                raise UsageError(
                    f"{where}: {name}: --lazy does not dequantize activation-ordered groups (g_idx)",
                    "load it without --lazy",
                )
            self.parts.setdefault(f"{match['module']}.weight", []).append(name)
        self.cast = dtype  # what the scales are cast to; the dequantized weights' dtype follows
        scales = [part for parts in self.parts.values() for part in parts if part.endswith(".weight_scale")]
        self.dtype = dtype or (source.load(scales[:1])[scales[0]].dtype if scales else None)

    def names(self) -> list[str]:
        return self.plain + list(self.parts)

    def layout(self, names: list[str]) -> dict[str, tuple[list[int], torch.dtype]]:
        """Shape and dtype of the tensors among ``names`` that :meth:`load` can write into buffers."""
        found = {n: (list(self.shapes[n]), self.dtype) for n in names if n in self.parts}
        if hasattr(self.source, "layout"):
            found.update(self.source.layout([n for n in names if n not in self.parts]))
        return found

    def load(self, names: list[str], into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        into = into or {}
        plain = [n for n in names if n not in self.parts]
        parts = [part for name in names for part in self.parts.get(name, [])]
        if hasattr(self.source, "layout"):
            found = self.source.load(plain, {n: into[n] for n in plain if n in into})
        else:
            found = self.source.load(plain)
        stored = self.source.load(parts)
        for name in names:
            if name not in self.parts:
                continue
            module = name.removesuffix(".weight")
            local = {part.removeprefix(f"{module}."): stored[part] for part in self.parts[name]}
            if self.cast is not None:
                local["weight_scale"] = local["weight_scale"].to(self.cast)
            weight = PackedQuantizationCompressor.decompress(local, self.scheme)["weight"]
            buffer = into.get(name)
            if buffer is not None and buffer.shape == weight.shape and buffer.dtype == weight.dtype:
                weight = buffer.copy_(weight)
            found[name] = weight
        return found
