"""Whisper: a speech encoder (two convolutions, then ``encoder_layers`` pre-LayerNorm blocks over
``max_source_positions`` frames of 20 ms) and a text decoder with cross-attention.

The model kind is ``speech-seq2seq`` (:mod:`streamify.kinds.speech`). It has
two block lists (``model.encoder.layers``, ``model.decoder.layers``); the
config's ``encoder_layers`` counts the first. The attention projections carry
biases on q, v and out but not k; LayerNorms have biases, so folding an AWQ
scale would have to divide them too: no group is declared. The encoder's
self-attention takes the chunk-causal mask of ``convert.causal``; its LoRA
targets (q/k/v/out) also match the decoder's self- and cross-attention, as
CarelessWhisper adapts them.
"""

from streamify.arch import Arch, EncoderAttention

ARCHS = (
    Arch(
        ("whisper",),
        awq_note="LayerNorm biases and cross-attention are not mapped: nothing is scaled",
        encoder_attention=EncoderAttention("encoder.layers", "self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ),
)
