"""Equivalence of a block-causal video denoiser against the stock diffusers model under the same mask.

The reference runs the stock diffusers model with its own attention processors
(projections, norms, rotary embedding, attention dispatch: none of streamify's
attention code), handed the block-causal mask of the spec. The runtime is
checked both ways it runs: the whole clip at once (training) and chunk by chunk
over its cache (generation).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from streamify.runtime.causal_video import VideoCache, caching, video_parts

EQUIVALENCE_CHUNKS = 4  # chunks in the checked clip
EQUIVALENCE_PATCHES = 4  # its height and width, in patches


class _MaskedStock:
    """The stock processor of one self-attention module, called with the block-causal mask."""

    def __init__(self, stock, mask: torch.Tensor) -> None:
        self.stock, self.mask = stock, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def _denoise(model: nn.Module, latents: torch.Tensor, condition: torch.Tensor, timestep: float) -> torch.Tensor:
    t = torch.tensor([timestep], device=latents.device)
    return model(hidden_states=latents, timestep=t, encoder_hidden_states=condition, return_dict=False)[0].float()


def stock_masked(model: nn.Module, latents: torch.Tensor, condition: torch.Tensor, timestep: float) -> torch.Tensor:
    """The stock model's output over the whole clip with every self-attention under the spec's mask."""
    ctl = model.streamify_video
    parts = video_parts(model, "the model")
    patch = ctl.patch
    frames, height, width = (n // p for n, p in zip(latents.shape[2:], patch, strict=True))
    positions = torch.arange(frames, device=latents.device).repeat_interleave(height * width)
    mask = ctl.spec.allowed(positions, positions)
    modules = [block.get_submodule(parts.attention) for block in model.get_submodule(parts.blocks)]
    ours = [module.processor for module in modules]
    try:
        for module in modules:
            module.processor = _MaskedStock(module.streamify_stock_processor, mask)
        return _denoise(model, latents, condition, timestep)
    finally:
        for module, processor in zip(modules, ours, strict=True):
            module.processor = processor


@torch.inference_mode()
def check_video_equivalence(model: nn.Module, seed: int = 0, timestep: float = 500.0) -> dict:
    """Max |difference| of the whole-clip and the chunked cached runtime from :func:`stock_masked`, on a seeded
    clip of :data:`EQUIVALENCE_CHUNKS` chunks (a non-square frame), with its scale and the ratio.

    A rolling window is checked without its window: until the cache first drops a frame the computation is the
    same, and from there on the cache re-indexes positions (by design) and holds keys computed with a context
    the whole clip no longer has, so no whole-clip reference exists (the tests check the dropping itself).
    """
    ctl = model.streamify_video
    config = model.config
    spec = ctl.spec
    chunk = spec.chunk_frames
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    frames = EQUIVALENCE_CHUNKS * chunk * ctl.patch[0]
    height, width = EQUIVALENCE_PATCHES * ctl.patch[1], (EQUIVALENCE_PATCHES + 1) * ctl.patch[2]
    latents = torch.randn(1, config["in_channels"], frames, height, width, generator=generator).to(device, dtype)
    condition = torch.randn(1, 8, config["text_dim"], generator=generator).to(device, dtype)
    ctl.spec = replace(spec, window_frames=None)
    try:
        reference = stock_masked(model, latents, condition, timestep)
        whole = _denoise(model, latents, condition, timestep)
        step = chunk * ctl.patch[0]
        with caching(model, VideoCache(), write=True):
            pieces = [_denoise(model, latents[:, :, s : s + step], condition, timestep) for s in range(0, frames, step)]
    finally:
        ctl.spec = spec
    chunked = torch.cat(pieces, dim=2)
    scale = reference.abs().max().item()
    whole_diff = (whole - reference).abs().max().item()
    chunked_diff = (chunked - reference).abs().max().item()
    return {
        "reference": "stock diffusers model, its own attention processors under the block-causal mask",
        "frames": frames,
        "chunk_frames": chunk,
        "window_checked": False if spec.window_frames is not None else None,
        "dtype": str(dtype).removeprefix("torch."),
        "whole_clip_max_abs_diff": whole_diff,
        "chunked_max_abs_diff": chunked_diff,
        "max_abs_output": scale,
        "max_rel_diff": max(whole_diff, chunked_diff) / scale if scale else 0.0,
    }
