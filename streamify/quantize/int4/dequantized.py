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

# compressed-tensors stores a quantized Linear's ``weight`` as these tensors
QUANTIZED_PART = re.compile(r"\.weight_(?P<part>packed|scale|shape|zero_point|g_idx)$")
_FORMAT = "pack-quantized"


def weight_scheme(quantization_config: Any, where: str):
    """The one compressed-tensors weight scheme of a ``pack-quantized`` config (UsageError for anything else)."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    settings = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    refused = "load it without --lazy"
    method = settings.get("quant_method")
    if method != "compressed-tensors":
        raise UsageError(f"{where}: --lazy dequantizes compressed-tensors INT weights; these are {method}", refused)
    try:
        config = QuantizationConfig.model_validate(settings)
    except ValidationError as exc:
        raise UsageError(
            f"{where}: config.json's quantization_config is not one compressed-tensors reads", refused
        ) from exc
    groups = list(config.config_groups.values())
    formats = {group.format or config.format for group in groups}
    if len(groups) != 1 or formats != {_FORMAT} or groups[0].weights is None:
        raise UsageError(
            f"{where}: --lazy dequantizes one pack-quantized INT weight scheme; this checkpoint has "
            f"{len(groups)} quantization group(s) in format(s) {', '.join(sorted(map(str, formats)))}",
            refused,
        )
    return groups[0]


class DequantizedWeights:
    """A :class:`~streamify.model.executor.WeightSource` that gives a quantized module's ``weight`` in float,
    dequantized from the parts ``source`` stores; other tensors pass through.

    ``dtype`` (None: each module's scale dtype) is what the scales are cast to before dequantizing, so the
    weight is computed in the dtype the model runs in, as transformers computes it. ``shapes`` are the model's
    tensor shapes: with them (and a ``dtype``) the source tells the executor what buffers to write into
    (``layout``), so a block's weights go into memory the previous block used.
    """

    def __init__(
        self, source: WeightSource, scheme: Any, dtype: torch.dtype | None, shapes: dict[str, torch.Size], where: str
    ) -> None:
        self.source, self.scheme, self.dtype, self.shapes = source, scheme, dtype, shapes
        self.source_fills = hasattr(source, "layout")  # the source decodes into given buffers too
        self.parts: dict[str, list[str]] = {}  # "<module>.weight" -> its stored parts
        self.plain: list[str] = []
        for name in source.names():
            match = QUANTIZED_PART.search(name)
            if match is None:
                self.plain.append(name)
                continue
            if match["part"] == "g_idx":
                raise UsageError(
                    f"{where}: {name}: --lazy does not dequantize activation-ordered groups (g_idx)",
                    "load it without --lazy",
                )
            self.parts.setdefault(f"{name[: match.start()]}.weight", []).append(name)

    def names(self) -> list[str]:
        return self.plain + list(self.parts)

    def layout(self, names: list[str]) -> dict[str, tuple[list[int], torch.dtype]]:
        """Shape and dtype of the tensors among ``names`` that :meth:`load` can write into buffers."""
        found = self.source.layout([n for n in names if n not in self.parts]) if self.source_fills else {}
        if self.dtype is not None:
            found.update({n: (list(self.shapes[n]), self.dtype) for n in names if n in self.parts})
        return found

    def load(self, names: list[str], into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        into = into or {}
        wanted = [n for n in names if n not in self.parts] + [p for n in names for p in self.parts.get(n, [])]
        if self.source_fills:
            stored = self.source.load(wanted, {n: into[n] for n in wanted if n in into})
        else:
            stored = self.source.load(wanted)
        found = {name: stored[name] for name in names if name not in self.parts}
        for name in (n for n in names if n in self.parts):
            module = name.removesuffix(".weight")
            local = {part.removeprefix(f"{module}."): stored[part] for part in self.parts[name]}
            if self.dtype is not None:
                local["weight_scale"] = local["weight_scale"].to(self.dtype)
            weight = PackedQuantizationCompressor.decompress(local, self.scheme)["weight"]
            buffer = into.get(name)
            if buffer is not None and buffer.shape == weight.shape and buffer.dtype == weight.dtype:
                weight = buffer.copy_(weight)
            found[name] = weight
        return found
