"""Mamba/attention hybrids transformers ships: Bamba and GraniteMoeHybrid.

They list their attention layers by index (``attn_layer_indices``); lists with
one entry per layer (``layers_block_type``) are sliced like any per-layer list.

Each is also a *target* of ``distill.hybrid`` (:data:`TARGETS`): how a
Llama-family decoder's config and weights are written in it, with the kept
attention layers, the norms and the MLPs holding the source's weights exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamify.arch import Arch

# GraniteMoeHybrid's config.json names its layers as IBM's published Granite 4.0 checkpoints do, which every
# runtime that loads those reads (transformers >= 5 maps these names to its own on load)
GRANITE_SAVED_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}

ARCHS = (
    Arch(("bamba",), layer_index_keys=("attn_layer_indices",), streaming=True),
    Arch(
        ("granitemoehybrid",),
        layer_index_keys=("attn_layer_indices",),
        streaming=True,
        saved_layer_types=GRANITE_SAVED_LAYER_TYPES,
    ),
)


@dataclass(frozen=True)
class MambaShape:
    """The Mamba2 mixer's sizes, chosen so that its x, B and C are as wide as the attention's V, K and Q."""

    heads: int  # the attention's query heads (and the mixer's heads and groups)
    head_dim: int  # the mixer's head size and state size; heads x head_dim is the hidden size


@dataclass(frozen=True)
class HybridTarget:
    """A hybrid architecture: its config from the source's, and the names its blocks give the source's weights.

    ``config(source_config, mamba, shape, bias)`` builds the target's config:
    layer ``i`` a Mamba2 mixer where ``mamba[i]``; ``bias`` when the source's
    attention has biases (Qwen2's q/k/v), which the target's attention and
    mixer projections then hold too.
    ``block_names`` maps a tensor name inside a source (Llama) block to the
    target's; ``mlp`` turns the source block's ``mlp.*`` tensors into the
    target's; ``final_norm`` is the target's name for ``model.norm.weight``.
    """

    model_type: str
    config: Callable[[object, list[bool], MambaShape, bool], object]
    block_names: dict[str, str]
    mlp: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    final_norm: str


def _common(source, shape: MambaShape, bias: bool) -> dict:
    """Config entries both targets share: sizes, norms, tokens, and the Mamba2 mixer's sizes."""
    return {
        "vocab_size": source.vocab_size,
        "hidden_size": source.hidden_size,
        "intermediate_size": source.intermediate_size,
        "num_hidden_layers": source.num_hidden_layers,
        "num_attention_heads": source.num_attention_heads,
        "num_key_value_heads": source.num_key_value_heads,
        "hidden_act": source.hidden_act,
        "max_position_embeddings": source.max_position_embeddings,
        "initializer_range": source.initializer_range,
        "rms_norm_eps": source.rms_norm_eps,
        "tie_word_embeddings": source.tie_word_embeddings,
        "bos_token_id": source.bos_token_id,
        "eos_token_id": source.eos_token_id,
        "pad_token_id": source.pad_token_id,
        "attention_bias": bias,
        "mamba_n_heads": shape.heads,
        "mamba_n_groups": shape.heads,
        "mamba_d_state": shape.head_dim,
        "mamba_d_head": shape.head_dim,
        "mamba_expand": 1,
        "mamba_proj_bias": bias,  # the copy init carries the q/k/v biases into in_proj
    }


def _granite_config(source, mamba: list[bool], shape: MambaShape, bias: bool):
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        **_common(source, shape, bias),
        shared_intermediate_size=source.intermediate_size,
        rope_parameters=dict(source.rope_parameters),
        position_embedding_type="rope",
        attention_multiplier=shape.head_dim**-0.5,  # Llama's softmax scale; every other multiplier stays 1
        num_local_experts=0,
        layer_types=["linear_attention" if m else "full_attention" for m in mamba],
    )


def _bamba_config(source, mamba: list[bool], shape: MambaShape, bias: bool):
    from transformers import BambaConfig

    return BambaConfig(
        **_common(source, shape, bias),
        rope_parameters={**dict(source.rope_parameters), "partial_rotary_factor": 1.0},  # Bamba's default is 0.5
        attn_layer_indices=[i for i, m in enumerate(mamba) if not m],
        mlp_bias=False,
    )


def _granite_mlp(mlp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "shared_mlp.input_linear.weight": torch.cat((mlp["mlp.gate_proj.weight"], mlp["mlp.up_proj.weight"])),
        "shared_mlp.output_linear.weight": mlp["mlp.down_proj.weight"],
    }


def _bamba_mlp(mlp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.replace("mlp.", "feed_forward.", 1): tensor for name, tensor in mlp.items()}


TARGETS = {
    "granitemoehybrid": HybridTarget(
        "granitemoehybrid",
        _granite_config,
        {
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        },
        _granite_mlp,
        "model.norm.weight",
    ),
    "bamba": HybridTarget(
        "bamba",
        _bamba_config,
        {
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "pre_ff_layernorm.weight",
        },
        _bamba_mlp,
        "model.final_layernorm.weight",
    ),
}
