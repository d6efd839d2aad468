"""Phi-3: fused q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``) projections.

The norms fold into the fused projections exactly. v -> o and up -> down
would fold into a slice of a fused linear's rows; they are not folded.
"""

from streamify.arch import Arch, ScaleGroup

ARCHS = (
    Arch(
        ("phi3",),
        awq_groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        awq_note="v -> o and up -> down sit inside fused projections: not scaled",
    ),
)
