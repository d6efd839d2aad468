"""BERT-style encoders (BERT, and the MiniLM sentence encoders built on it): post-LayerNorm blocks.

The LayerNorm follows each sub-block's residual sum, so no norm feeds a
projection alone: no AWQ scale group is exact and none is declared. The model
kind is ``encoder`` (:mod:`streamify.kinds.encoder`); positions are learned, up
to ``max_position_embeddings``. The self-attention (``attention.self`` in each
block) takes the chunk-causal mask of ``convert.causal``.
"""

from streamify.arch import Arch, EncoderAttention

ARCHS = (
    Arch(
        ("bert",),
        awq_note="post-LayerNorm blocks: no norm feeds a projection alone, nothing is scaled",
        encoder_attention=EncoderAttention(
            "encoder.layer", "attention.self", ("query", "key", "value", "attention.output.dense")
        ),
    ),
)
