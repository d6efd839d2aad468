"""Wan 2.1 video diffusion transformer (diffusers ``WanTransformer3DModel``), a flow-matching denoiser.

It reads latents ``[batch, channels, frames, height, width]`` (frames and sides
multiples of its patch size), a timestep in [0, 1000] and text-encoder states
``[batch, tokens, text_dim]``.
"""

from __future__ import annotations

from typing import Any

import torch

from streamify.arch import Arch, VideoAttention

LATENT_PATCHES = (2, 4, 4)  # frames, height, width of the eval latents, in patches
CONDITION_TOKENS = 16


def wan_inputs(config: Any, count: int, generator: torch.Generator) -> list[dict]:
    """``count`` seeded Gaussian latents of a small clip and text conditions for a Wan denoiser."""
    shape = [config["in_channels"], *(n * p for n, p in zip(LATENT_PATCHES, config["patch_size"], strict=True))]
    return [
        {
            "latents": torch.randn(1, *shape, generator=generator),
            "condition": torch.randn(1, CONDITION_TOKENS, config["text_dim"], generator=generator),
        }
        for _ in range(count)
    ]


ARCHS = (
    Arch(
        ("WanTransformer3DModel",),
        denoiser_inputs=wan_inputs,
        causal_video=VideoAttention(blocks="blocks", attention="attn1", rope="rope", patch_key="patch_size"),
    ),
)
