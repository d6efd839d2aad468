"""Mamba/attention hybrids transformers ships: Bamba and GraniteMoeHybrid.

They list their attention layers by index (``attn_layer_indices``); lists with
one entry per layer (``layers_block_type``) are sliced like any per-layer list.
"""

from streamify.arch import Arch

ARCHS = (Arch(("bamba", "granitemoehybrid"), layer_index_keys=("attn_layer_indices",)),)
