"""Write an INT4 artifact in compressed-tensors' ``pack-quantized`` format, one block at a time.

Each target linear's dequantized weight, scale (and zero point) go through the
library's own per-module compressor (codes packed eight to an int32,
``weight_shape`` recorded), the rest is cast to the artifact's float dtype, and
the tensors are written shard by shard as transformers writes them
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``); ``config.json`` gets the
``quantization_config`` that transformers and vLLM read. The same writer serves
a model held in memory and one calibrated block by block from disk (a block is
written while it is in memory, then dropped), so both paths give the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from streamify.io.atomic import file_written, save_torch
from streamify.io.safetensors_file import INDEX_NAME, shard_index, shard_names
from streamify.model.blocks import block_list, block_tensors
from streamify.model.cast import keeps_fp32
from streamify.quantize.int4.grid import Int4Weight

FORMAT = "pack-quantized"
STATE_JSON = "shards.json"  # a resumable block-wise run's state
SHARD_BYTES = 1 << 30  # a shard is closed before it would pass 1 GiB (a block larger than that gets its own)


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
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)},
        ignore=ignore,
        format=FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
    )


class PackedShards:
    """The weight files of a compressed-tensors artifact, written module by module into ``folder``.

    ``targets`` names every quantized linear of the model (the others are listed
    as ignored in the config); ``float_dtype`` is what the unquantized tensors are stored in (but those the
    model's class keeps in fp32).
    """

    def __init__(
        self,
        folder: Path,
        model: nn.Module,
        targets: list[str],
        group_size: int,
        symmetric: bool,
        float_dtype: torch.dtype,
        shard_bytes: int | None = None,
    ) -> None:
        from compressed_tensors.compressors.base import BaseCompressor

        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        self.config = quantization_config(group_size, symmetric, [n for n in linears if n not in set(targets)])
        self.scheme = self.config.config_groups["group_0"]
        self.compressor = BaseCompressor.get_value_from_registry(FORMAT)
        self.folder, self.float_dtype, self.shard_bytes = folder, float_dtype, shard_bytes or SHARD_BYTES
        self.keeps_fp32 = lambda name: keeps_fp32(model, name)
        self.pending: dict[str, torch.Tensor] = {}
        self.written: list[tuple[Path, list[str]]] = []  # shard file, its tensor names
        self.kept: list[str] = []  # floating-point tensors left in fp32 because the model's class keeps them so
        self.total = 0

    @torch.no_grad()
    def add(self, tensors: dict[str, torch.Tensor], quantized: dict[str, Int4Weight]) -> None:
        """Write the saved ``tensors`` (by qualified name) of part of the model; the weight of a linear named in
        ``quantized`` is written packed. A tensor met twice (tied weights) is written once, under its first name."""
        found: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in tensors.items():
            if name.removesuffix(".weight") in quantized or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            value = tensor.detach()
            kept = value.is_floating_point() and self.keeps_fp32(name)
            if kept:
                self.kept.append(name)
            cast = value.is_floating_point() and not kept
            found[name] = (value.to(self.float_dtype) if cast else value).cpu()
        for name in {n.removesuffix(".weight") for n in tensors} & set(quantized):
            weight = quantized[name]
            local = {
                "weight": weight.dequantize(self.float_dtype).cpu(),
                "weight_scale": weight.scale.to(self.float_dtype).cpu(),
                "weight_zero_point": weight.zero.to(torch.int8).cpu(),
            }
            packed = self.compressor.compress(local, self.scheme)
            found.update({f"{name}.{key}": value.contiguous() for key, value in packed.items()})
        size = sum(t.numel() * t.element_size() for t in found.values())
        held = sum(t.numel() * t.element_size() for t in self.pending.values())
        if self.pending and held + size > self.shard_bytes:
            self._flush()
        self.pending.update(found)
        self.total += size

    def finish(self, model: nn.Module, into: Path | None = None) -> None:
        """Write the last shard, name the shards and move them ``into`` the artifact folder (default: where they
        were written), write the index (several shards) and ``model``'s config there."""
        from compressed_tensors.compressors import ModelCompressor

        into = into or self.folder
        (self.folder / STATE_JSON).unlink(missing_ok=True)  # from here on there is no state to resume from
        self._flush()
        weight_map = {}
        finals = shard_names(len(self.written))
        for final, (path, names) in zip(finals, self.written, strict=True):
            shutil.move(path, into / final)  # a rename on one filesystem
            weight_map.update(dict.fromkeys(names, final))
        if len(finals) > 1:
            (into / INDEX_NAME).write_text(shard_index(weight_map, self.total))
        model.config.dtype = self.float_dtype
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(into)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(into)
        ModelCompressor(quantization_config=self.config).update_config(str(into))

    def save_state(self, folder: Path, tag: int, extra: dict) -> None:
        """Keep what :meth:`restore_state` needs to go on after a kill: the shards written so far (their files
        stay), the tensors not yet in one (in a file of their own for ``tag``) and ``extra`` (JSON). The state
        file, written last, is the commit: a kill before it leaves the previous state whole."""
        pending = folder / f"pending-{tag}.pt"
        save_torch(self.pending, pending)  # streamed to the file (safetensors would build it in memory first)
        state = {
            "written": [(path.name, names) for path, names in self.written],
            "pending": pending.name,
            "kept": self.kept,
            "total": self.total,
            "extra": extra,
        }
        with file_written(folder / STATE_JSON) as tmp:
            tmp.write_text(json.dumps(state))
        for older in folder.glob("pending-*.pt"):
            if older != pending:
                older.unlink(missing_ok=True)

    def restore_state(self, folder: Path) -> dict | None:
        """Go on from :meth:`save_state`'s state in ``folder``; its ``extra`` (None when there is none)."""
        if not (folder / STATE_JSON).is_file():
            return None
        state = json.loads((folder / STATE_JSON).read_text())
        if not all((self.folder / name).is_file() for name, _ in state["written"]):
            return None  # a run stopped while its shards moved into the artifact: nothing to go on from
        self.written = [(self.folder / name, names) for name, names in state["written"]]
        self.kept, self.total = state["kept"], state["total"]
        self.pending = torch.load(folder / state["pending"], weights_only=True)
        return state["extra"]

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.written):05d}.safetensors.part"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending = {}


def write_compressed_tensors(
    model: nn.Module, quantized: dict[str, Int4Weight], symmetric: bool, float_dtype: torch.dtype, folder: Path
) -> None:
    """Save an in-memory ``model`` with the ``quantized`` linears packed, plus its config, into ``folder``."""
    prefix, blocks = block_list(model, type(model).__name__)
    group_size = next(iter(quantized.values())).group_size
    shards = PackedShards(folder, model, list(quantized), group_size, symmetric, float_dtype)
    for index in range(len(blocks)):
        shards.add(block_tensors(model, prefix, index), quantized)
    shards.add(block_tensors(model, prefix, None), quantized)
    shards.finish(model)
