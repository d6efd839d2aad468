"""dtype and device names as users write them, checked and turned into torch objects."""

from __future__ import annotations

from typing import Literal

import torch

from streamify.errors import UsageError

DtypeName = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype | str:
    """``fp32|bf16|fp16`` -> torch dtype; ``auto`` stays ``"auto"`` (keep the checkpoint's)."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'", "use one of: auto, fp32, bf16, fp16")
    return DTYPES[name]


def config_dtype(config) -> torch.dtype | None:
    """The dtype a transformers config names for its weights (``dtype``, a name or a torch dtype), None if none."""
    named = getattr(config, "dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) else None


def resolve_device(name: str) -> torch.device:
    """Check a device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``auto``) against this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device '{name}'", "use cpu, cuda, cuda:N, mps or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' requested but CUDA is not available here", "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device '{name}' does not exist ({torch.cuda.device_count()} GPUs)", "use cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{name}' requested but MPS is not available here", "use --device cpu")
    return device


def teacher_dtype(name: str, student: torch.Tensor) -> torch.dtype:
    """The dtype a separate (frozen) teacher is kept in: ``name`` (fp32, bf16, fp16), or for ``auto`` bf16 on a
    GPU that supports it and the dtype of ``student`` (one of its parameters) elsewhere."""
    if name != "auto":
        return DTYPES[name]
    on_bf16_gpu = student.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if on_bf16_gpu and student.is_floating_point() else student.dtype
