"""OLMo 2: norms only after attention and MLP (and q/k norms), none before them.

The projections read the raw residual stream, so no scale can be folded into
a norm ahead of q/k/v or gate/up; only v -> o and up -> down fold exactly.
"""

from streamify.arch import Arch, ScaleGroup

ARCHS = (
    Arch(
        ("olmo2",),
        awq_groups=(
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        awq_note="q/k/v and gate/up read the residual stream directly (no pre-norm): not scaled",
    ),
)
