"""What each architecture family is, declared once: one module per family, found without a hand-kept list.

Every stage asks :func:`arch_for` / :func:`require` instead of checking a
``model_type`` string itself. An :class:`Arch` declares:

- ``awq_groups``: the (preceding op -> linears that read its output) pairs AWQ
  may fold a scale through *exactly*, with the block's real semantics
  (post-norms, fused projections); ``None`` when none is mapped, and AWQ refuses.
- ``streaming``: the sink + window runtime handles its attention (rotary, ``self_attn``).
- ``native_target``: the transformers architecture with per-layer sliding
  windows that holds its weights exactly (``--export-arch native``);
  ``native_holds_bias`` False when that target has no attention or MLP biases.
- ``gguf_architecture``: the llama.cpp architecture our GGUF writer maps it to.
- ``layer_index_keys`` / ``layer_count_keys``: config keys that hold layer
  *indices* or a *number of layers* (sliced when blocks are removed); lists with
  one entry per layer are sliced for every architecture.
- ``encoder_attention``: where an encoder's self-attention lives
  (:class:`EncoderAttention`), for the chunk-causal mask and causal LoRA of
  ``convert.causal``.
- ``causal_video``: where a video denoiser's blocks, their self-attention, its rotary
  embedding and its patch size are (:class:`VideoAttention`), for ``convert.causal_video``.
- ``hybrid_source``: its decoder block is Llama's exactly (attention, norms, gated MLP), so
  ``distill.hybrid`` can rewrite it into a Mamba/attention hybrid (:mod:`streamify.arch.hybrid`).
- ``saved_layer_types``: names ``config.json`` gives the entries of ``layer_types`` (the names the
  family's published checkpoints use), where they differ from those transformers holds in memory.
- ``denoiser_inputs(config, count, generator)``: for a diffusion denoiser, ``count``
  clean latents and conditions of the shapes it reads (its eval and training data).

A transformers model is keyed by its ``model_type``, a diffusers model by its
class name (:func:`family_key`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from streamify.errors import InputError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (names inside a block) that read the output of ``previous`` (a norm or a linear) and nothing else."""

    previous: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class EncoderAttention:
    """An encoder's self-attention: the block list (a dotted path from the base model), the module in each block
    that calls transformers' attention function, and its linear layers (the causal LoRA targets)."""

    layers: str
    attention: str
    projections: tuple[str, ...]


@dataclass(frozen=True)
class VideoAttention:
    """A video denoiser's block list, the self-attention module in each block (diffusers' ``Attention`` with
    ``to_q``/``to_k``/``to_v``/``norm_q``/``norm_k``/``to_out``), its rotary embedding module (called on a
    latent-shaped tensor, returning cos and sin per token) and the config key of its (frames, height, width)
    patch size."""

    blocks: str
    attention: str
    rope: str
    patch_key: str


@dataclass(frozen=True)
class Arch:
    """What the stages need to know about one architecture family (see the module docstring)."""

    model_types: tuple[str, ...]
    awq_groups: tuple[ScaleGroup, ...] | None = None
    awq_note: str = ""
    streaming: bool = False
    native_target: str | None = None
    native_holds_bias: bool = True
    gguf_architecture: str | None = None
    layer_index_keys: tuple[str, ...] = ()
    layer_count_keys: tuple[str, ...] = ()
    encoder_attention: EncoderAttention | None = None
    denoiser_inputs: Callable[[Any, int, Any], list[dict]] | None = None
    causal_video: VideoAttention | None = None
    hybrid_source: bool = False
    saved_layer_types: Mapping[str, str] | None = None


LLAMA_AWQ = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)


@cache
def _registry() -> dict[str, Arch]:
    found: dict[str, Arch] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for arch in getattr(module, "ARCHS", ()):
            for model_type in arch.model_types:
                if model_type in found:
                    raise RuntimeError(f"model_type {model_type} is declared twice in streamify.arch")
                found[model_type] = arch
    return found


def family_key(config: Any) -> str | None:
    """What :func:`arch_for` is keyed by: a transformers config's ``model_type``, a diffusers config's class name."""
    model_type = getattr(config, "model_type", None)
    if model_type:
        return model_type
    return config.get("_class_name") if isinstance(config, Mapping) else None


def arch_for(model_type: str | None) -> Arch | None:
    """The family ``model_type`` belongs to, or None when streamify declares nothing for it."""
    return _registry().get(model_type or "")


def supported(what: str) -> list[str]:
    """The model types whose family declares ``what`` (an :class:`Arch` field)."""
    return sorted(t for t, arch in _registry().items() if getattr(arch, what))


def require(model_type: str | None, what: str, purpose: str, where: str) -> Arch:
    """The family of ``model_type`` when it declares ``what``; else :class:`InputError` (exit 3) naming it."""
    arch = arch_for(model_type)
    if arch is None or not getattr(arch, what):
        raise InputError(
            f"{where}: {purpose} is not available for the '{model_type}' architecture "
            f"(streamify.arch declares no {what} for it)",
            f"supported architectures: {', '.join(supported(what))}",
        )
    return arch
