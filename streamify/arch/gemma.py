"""Gemma (Llama's block, RMSNorm scaled by 1 + weight) and Gemma 2/3 (norms after attention and MLP too).

In Gemma 2/3 ``post_attention_layernorm`` normalises the attention *output*;
the MLP reads ``pre_feedforward_layernorm``. Folding through the post-norm
would change the residual stream, so the MLP group folds into the pre-norm.
"""

from streamify.arch import LLAMA_AWQ, Arch, ScaleGroup

GEMMA2_AWQ = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)

ARCHS = (
    Arch(("gemma",), awq_groups=LLAMA_AWQ, streaming=True),
    Arch(("gemma2", "gemma3_text"), awq_groups=GEMMA2_AWQ),
)
