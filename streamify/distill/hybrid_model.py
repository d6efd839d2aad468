"""A Llama-family decoder rewritten as a Mamba2/attention hybrid that transformers ships (GraniteMoeHybrid, Bamba).

The kept attention layers, every norm, every MLP and the embeddings hold the
source's weights exactly (with no layer replaced, the hybrid's logits are the
source's). A replaced layer's attention becomes a Mamba2 mixer whose x, B and C
are as wide as the attention's V, K and Q (one group per query head, state size
= head size), so MambaInLlama's initialisation can copy them:

- ``copy``: ``in_proj`` packs [z | x | B | C | dt]; x <- V, B <- K (key/value
  heads repeated for grouped-query attention), C <- Q, ``out_proj`` <- O (and
  the biases where the attention has them); z, dt, the convolution, A, D and
  the gated norm start fresh.
- ``random``: the whole mixer starts fresh.

Fresh is Mamba2's own initialisation (as in ``mamba_ssm``): time steps
log-uniform in [0.001, 0.1] (``dt_bias`` their inverse softplus), A uniform in
[1, 16], D = 1; linear layers and the convolution as transformers initialises
them. (transformers' own ``dt_bias = 1``, ``A = 1..heads`` forgets within a
token or two on most heads.)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from streamify.arch import require
from streamify.arch.hybrid import TARGETS, MambaShape
from streamify.errors import InputError
from streamify.model.blocks import block_list

BLOCK_PREFIX = "model.layers."
DT_RANGE = (1e-3, 1e-1)  # Mamba2's initial time steps
DT_FLOOR = 1e-4
A_RANGE = (1.0, 16.0)


def mamba_shape(config, where: str) -> MambaShape:
    """The mixer's sizes for a source config; :class:`InputError` when the attention is not as wide as the model."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads * head_dim != config.hidden_size:
        raise InputError(
            f"{where}: the attention is {heads} heads x {head_dim} = {heads * head_dim} wide, not the hidden size "
            f"{config.hidden_size}; the hybrid targets (GraniteMoeHybrid, Bamba) need attention as wide as the model",
            "convert a model whose head_dim x num_attention_heads equals hidden_size (Llama, Qwen2, Mistral are)",
        )
    return MambaShape(heads, head_dim)


def check_source(config, where: str) -> MambaShape:
    """Refuse a source the rewrite cannot hold exactly; returns the mixer's sizes."""
    require(getattr(config, "model_type", None), "hybrid_source", "hybrid distillation", where)
    windows = [t for t in getattr(config, "layer_types", None) or () if "sliding" in t]
    if windows or (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        raise InputError(
            f"{where}: the model attends through a sliding window (sliding_window={config.sliding_window}), "
            "which the hybrid's full-attention layers would not keep",
            "convert a model with full attention, or set sliding_window to null in its config.json",
        )
    if getattr(config, "mlp_bias", False):
        raise InputError(
            f"{where}: the MLP has biases, which the hybrid targets' MLPs do not hold",
            "convert a model without mlp_bias",
        )
    return mamba_shape(config, where)


def to_hybrid(
    source: nn.Module, mamba: list[bool], init: Literal["copy", "random"], target: str, where: str
) -> nn.Module:
    """A new ``target`` model: layer ``i`` a Mamba2 mixer where ``mamba[i]``, else ``source``'s attention."""
    from transformers import AutoModelForCausalLM

    shape = check_source(source.config, where)
    spec = TARGETS[target]
    first = next(source.parameters())
    _, blocks = block_list(source, where)
    with torch.device(first.device):  # built where the source is: no second copy in host memory on a GPU
        hybrid = AutoModelForCausalLM.from_config(
            spec.config(source.config, mamba, shape, attention_bias(source, where)), dtype=first.dtype
        )
    hybrid.generation_config = source.generation_config
    state = source.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith(BLOCK_PREFIX):
            out[spec.final_norm if name == "model.norm.weight" else name] = tensor
    for index in range(len(blocks)):
        prefix = f"{BLOCK_PREFIX}{index}."
        block = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
        mapped = {spec.block_names[name]: t for name, t in block.items() if name in spec.block_names}
        mapped.update(spec.mlp({name: t for name, t in block.items() if name.startswith("mlp.")}))
        attention = {name: t for name, t in block.items() if name.startswith("self_attn.")}
        if not mamba[index]:
            mapped.update(attention)
        out.update({prefix + name: t for name, t in mapped.items()})
    missing, unexpected = hybrid.load_state_dict(out, strict=False)
    fresh = [n for n in missing if ".mamba." not in n and not n.endswith("o_proj.bias")]
    if fresh or unexpected:
        raise RuntimeError(f"hybrid rewrite left {fresh or unexpected} unmatched (a target mapping is incomplete)")
    _, hybrid_blocks = block_list(hybrid, "hybrid")
    with torch.no_grad():
        for name in missing:
            if name.endswith("o_proj.bias"):  # Qwen2 has no output bias; the target's is all or none
                hybrid.get_parameter(name).zero_()
        for index, block in enumerate(blocks):
            if mamba[index]:
                mamba2_init(hybrid_blocks[index].mamba)
                if init == "copy":
                    copy_attention(hybrid_blocks[index].mamba, block.self_attn, shape)
    return hybrid.eval()


def attention_bias(model: nn.Module, where: str) -> bool:
    """Whether the model's attention projections have biases (Qwen2's q/k/v)."""
    _, blocks = block_list(model, where)
    return blocks[0].self_attn.q_proj.bias is not None


@torch.no_grad()
def mamba2_init(mixer: nn.Module) -> None:
    """Mamba2's initial time steps, decay and skip (see the module docstring) on a transformers mixer."""
    heads = mixer.dt_bias.shape[0]
    low, high = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
    dt = torch.exp(torch.rand(heads) * (high - low) + low).clamp(min=DT_FLOOR)
    mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
    mixer.A_log.copy_(torch.log(torch.empty(heads).uniform_(*A_RANGE)))
    mixer.D.fill_(1.0)


def hybrid_parameters(source_config, mamba: list[bool], target: str, bias: bool) -> int:
    """Parameters of the hybrid ``to_hybrid`` would build (counted on the meta device, nothing allocated)."""
    from transformers import AutoModelForCausalLM

    from streamify.model.params import count_params

    config = TARGETS[target].config(source_config, mamba, mamba_shape(source_config, "model"), bias)
    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(config))


def _repeat_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Rows of ``kv_heads`` heads repeated so that query head ``h`` gets key/value head ``h // (heads / kv_heads)``."""
    rows = weight.reshape(kv_heads, -1, *weight.shape[1:])
    return rows.repeat_interleave(heads // kv_heads, dim=0).reshape(-1, *weight.shape[1:])


@torch.no_grad()
def copy_attention(mixer: nn.Module, attention: nn.Module, shape: MambaShape) -> None:
    """MambaInLlama's initialisation of ``mixer`` from ``attention``: x <- V, B <- K, C <- Q, out_proj <- O."""
    width = shape.heads * shape.head_dim
    kv_heads = attention.k_proj.weight.shape[0] // shape.head_dim
    sources = {
        width: attention.v_proj,  # x starts after z
        2 * width: attention.k_proj,  # B
        3 * width: attention.q_proj,  # C
    }
    for start, linear in sources.items():
        weight = linear.weight if linear is attention.q_proj else _repeat_heads(linear.weight, kv_heads, shape.heads)
        mixer.in_proj.weight[start : start + width] = weight
        if linear.bias is not None and mixer.in_proj.bias is not None:
            bias = linear.bias if linear is attention.q_proj else _repeat_heads(linear.bias, kv_heads, shape.heads)
            mixer.in_proj.bias[start : start + width] = bias
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    if mixer.out_proj.bias is not None:
        out_bias = attention.o_proj.bias
        mixer.out_proj.bias.copy_(out_bias if out_bias is not None else torch.zeros_like(mixer.out_proj.bias))
