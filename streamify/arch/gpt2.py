"""GPT-2: learned absolute positions (``n_positions``), LayerNorm with bias, ``Conv1D`` projections.

Its projections are ``Conv1D`` modules (weights stored transposed), not
``nn.Linear``: INT4 finds no linear layer in its blocks, and no AWQ scale group
is declared. Its blocks live at ``transformer.h``; the layer count is ``n_layer``.
"""

from streamify.arch import Arch

ARCHS = (Arch(("gpt2",), awq_note="projections are Conv1D, not Linear: not scaled"),)
