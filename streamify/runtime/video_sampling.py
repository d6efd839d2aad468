"""Flow-matching sampling of video denoisers: the whole clip (a bidirectional teacher) and chunk by chunk over a
block-causal cache (a streaming student).

The convention is the one the denoiser kind scores: ``x_s = (1 - s) x_0 + s e``
at timestep ``1000 s``, the model predicts the velocity ``e - x_0``, so
``x_0 = x_s - s v``. A noise level is one number for the whole clip or one per
latent frame of the token grid (stock Wan takes per-token timesteps,
``[batch, tokens]``, which diffusion forcing and ODE initialisation use to give
every chunk its own level).

The few-step student (CausVid, Self-Forcing) denoises a chunk at the levels of
its schedule (e.g. timesteps 1000, 750, 500, 250): at each it predicts ``x_0``
and, unless it was the last, noises that back to the next level with fresh
noise; the chunk's ``x_0`` is then run once more at level 0 to write its keys
and values into the cache, which the next chunk attends to.

Classifier-free guidance (``guidance`` g ≠ 1) runs every pass on the batch
twice, with the condition and with the unconditional one, and returns
``v_u + g (v_c − v_u)``. The unconditional condition is all-zero tokens (the
unconditional model that ``condition_dropout`` trains), or a negative prompt's
text-encoder states set with :func:`negative_condition` (``WanPipeline``
encodes its ``negative_prompt``, ``""`` by default, for it). Under a block-causal cache the doubled batch makes the
cache hold both branches, each computed with its own condition, as guided
autoregressive sampling needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise

import torch
from torch import nn

from streamify.errors import UsageError
from streamify.runtime.causal_video import VideoCache, VideoSpec, caching

NEGATIVE = "streamify_negative_condition"  # the model attribute negative_condition sets


def shifted_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` noise levels from 1 to 0, uniform in time, then warped by ``shift`` as Wan's flow-matching
    scheduler does (``shift s / (1 + (shift - 1) s)``; 1 leaves them uniform)."""
    levels = [1 - i / steps for i in range(steps + 1)]
    return [shift * s / (1 + (shift - 1) * s) for s in levels]


def _patch(model: nn.Module) -> tuple[int, int, int]:
    return tuple(model.config["patch_size"])


def _per_frame(sigma: torch.Tensor, latents: torch.Tensor, patch_frames: int) -> torch.Tensor:
    """``[batch, grid frames]`` levels as ``[batch, 1, latent frames, 1, 1]``, to scale latents with."""
    return sigma.repeat_interleave(patch_frames, dim=1)[:, None, :, None, None].to(latents)


def velocity(
    model: nn.Module, latents: torch.Tensor, condition: torch.Tensor, sigma, guidance: float = 1.0
) -> torch.Tensor:
    """The model's velocity for ``latents`` at level ``sigma`` (a float, ``[batch]`` or ``[batch, grid frames]``),
    guided by ``guidance`` (module doc; 1: the conditional velocity alone)."""
    device = latents.device
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(latents.shape[0])
    if sigma.ndim == 2:  # one level per frame of the token grid: per-token timesteps
        patch = _patch(model)
        per_frame = (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])
        sigma = sigma.repeat_interleave(per_frame, dim=1)
    guided = guidance != 1.0
    if guided:  # the conditional and the unconditional branch in one batch
        latents, sigma = torch.cat((latents, latents)), torch.cat((sigma, sigma))
        condition = torch.cat((condition, _unconditional(model, condition)))
    dtype = next(model.parameters()).dtype
    out = model(
        hidden_states=latents.to(dtype),
        timestep=1000 * sigma,
        encoder_hidden_states=condition.to(dtype),
        return_dict=False,
    )[0].float()
    if not guided:
        return out
    conditional, unconditional = out.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


@contextlib.contextmanager
def negative_condition(model: nn.Module, tokens: torch.Tensor | None) -> Iterator[None]:
    """Inside, guided passes of ``model`` take ``tokens`` ``[tokens, text_dim]`` (a negative prompt's text-encoder
    states) as their unconditional condition instead of zeros; None leaves the zeros."""
    before = getattr(model, NEGATIVE, None)
    setattr(model, NEGATIVE, tokens)
    try:
        yield
    finally:
        setattr(model, NEGATIVE, before)


def _unconditional(model: nn.Module, condition: torch.Tensor) -> torch.Tensor:
    negative = getattr(model, NEGATIVE, None)
    if negative is None:
        return torch.zeros_like(condition)
    if negative.shape != condition.shape[1:]:
        raise UsageError(
            f"the negative prompt's states are {list(negative.shape)}, the conditions' {list(condition.shape[1:])}",
            "encode the negative prompt with the prompts (streamify encode-prompts --negative), at the same length",
        )
    return negative.to(condition).expand_as(condition)


def predict_clean(
    model: nn.Module, latents: torch.Tensor, condition: torch.Tensor, sigma, guidance: float = 1.0
) -> torch.Tensor:
    """``x_0 = x_s - s v``: the model's clean clip from ``latents`` at level ``sigma`` (as in :func:`velocity`)."""
    v = velocity(model, latents, condition, sigma, guidance)
    scale = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    if scale.ndim == 1:
        scale = scale[:, None, None, None, None]
    elif scale.ndim == 2:
        scale = _per_frame(scale, latents, _patch(model)[0])
    return latents.float() - scale * v


def noised(clean: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``(1 - s) x_0 + s e`` for a level per clip (``[batch]``) or per grid frame (``[batch, frames]``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=clean.device)
    if sigma.ndim == 1:
        sigma = sigma[:, None, None, None, None]
    elif sigma.ndim == 2:
        sigma = _per_frame(sigma, clean, noise.shape[2] // sigma.shape[1])
    return (1 - sigma) * clean + sigma * noise


@torch.no_grad()
def sample_clip(
    model: nn.Module,
    noise: torch.Tensor,
    condition: torch.Tensor,
    sigmas: Sequence[float],
    keep: Sequence[int] = (),
    guidance: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler steps of the flow ODE over the whole clip from ``noise`` through the levels ``sigmas`` (1 ... 0),
    guided by ``guidance``; returns the end and the states before the steps named in ``keep`` (Self-Forcing's ODE
    pairs)."""
    x = noise.float()
    kept = []
    for index, (sigma, following) in enumerate(pairwise(sigmas)):
        if index in keep:
            kept.append(x.clone())
        x = x + (following - sigma) * velocity(model, x, condition, sigma, guidance)
    return x, kept


def chunk_length(model: nn.Module) -> int:
    """Latent frames in one chunk of a block-causal model (its spec's chunk times the temporal patch)."""
    ctl = getattr(model, "streamify_video", None)
    if ctl is None:
        raise UsageError("the model is not block-causal", "convert it first: streamify convert causal-video")
    return ctl.spec.chunk_frames * ctl.patch[0]


def denoise_chunk(
    model: nn.Module,
    cache: VideoCache,
    noise: torch.Tensor,
    condition: torch.Tensor,
    sigmas: Sequence[float],
    *,
    exit_level: int | None = None,
    generator: torch.Generator | None = None,
    euler: bool = False,
    guidance: float = 1.0,
) -> torch.Tensor:
    """One chunk's clean latents from its ``noise`` over ``cache`` at the few-step levels ``sigmas`` (1 first, 0 not
    included), then the clean re-run at level 0 that appends the chunk to the cache.

    With ``exit_level`` (Self-Forcing's training rollout) the chunk stops at that level, whose prediction keeps its
    gradient when gradients are on; the levels before it and the cache re-run never do. With ``euler`` the chunk
    follows the flow ODE through ``sigmas`` and 0 instead (a many-step model, such as a diffusion-forced one).
    Every pass of one cache must use the same ``guidance``: a guided cache holds both branches.
    """
    if euler:
        x = noise.float()
        with caching(model, cache, write=False), torch.no_grad():
            for sigma, following in pairwise([*sigmas, 0.0]):
                x = x + (following - sigma) * velocity(model, x, condition, sigma, guidance)
        with caching(model, cache, write=True), torch.no_grad():
            velocity(model, x, condition, 0.0, guidance)
        return x
    last = len(sigmas) - 1 if exit_level is None else exit_level
    keep_gradient = exit_level is not None and torch.is_grad_enabled()
    x = noise.float()
    for level, sigma in enumerate(sigmas[: last + 1]):
        with caching(model, cache, write=False), torch.set_grad_enabled(keep_gradient and level == last):
            clean = predict_clean(model, x, condition, sigma, guidance)
        if level < last:
            fresh = torch.randn(x.shape, generator=generator).to(x.device) if generator else torch.randn_like(x)
            x = noised(clean.detach(), fresh, torch.full((x.shape[0],), sigmas[level + 1]))
    with caching(model, cache, write=True), torch.no_grad():
        velocity(model, clean.detach(), condition, 0.0, guidance)
    return clean


def rollout(
    model: nn.Module,
    noise: torch.Tensor,
    condition: torch.Tensor,
    sigmas: Sequence[float],
    *,
    exits: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The clip's clean latents, generated chunk by chunk over a fresh cache from ``noise`` ``[batch, C, frames, H,
    W]`` (:func:`denoise_chunk`; ``exits[c]``: chunk ``c``'s exit level when training)."""
    step = chunk_length(model)
    if noise.shape[2] % step:
        raise UsageError(
            f"the clip has {noise.shape[2]} latent frames, not a whole number of chunks of {step}",
            f"give a multiple of {step} frames",
        )
    cache = VideoCache()
    chunks = [
        denoise_chunk(
            model,
            cache,
            noise[:, :, start : start + step],
            condition,
            sigmas,
            exit_level=None if exits is None else exits[index],
            generator=generator,
        )
        for index, start in enumerate(range(0, noise.shape[2], step))
    ]
    return torch.cat(chunks, dim=2)


def check_rotary_range(
    config: Mapping, frames: int, height: int, width: int, spec: VideoSpec | None = None, where: str = ""
) -> None:
    """UsageError when one attention over a clip of ``frames`` x ``height`` x ``width`` latents would need rotary
    positions past the model's table (``rope_max_seq_len`` per axis of the token grid): a side too large, or
    more frames than it covers. ``spec``: the clip goes chunk by chunk through this cache, whose rolling window
    (if any) re-numbers its frames; None: one attention over the whole clip. ``where`` prefixes the message."""
    limit = config.get("rope_max_seq_len")
    if limit is None:
        return
    patch = config["patch_size"]
    for option, size, axis_patch in (("--height", height, patch[1]), ("--width", width, patch[2])):
        if size // axis_patch > limit:
            raise UsageError(
                f"{where}{option} {size}: the model's rotary positions cover {limit} patches a side "
                f"(rope_max_seq_len {limit}, patch {axis_patch})",
                f"give at most {limit * axis_patch}",
            )
    span, held = frames // patch[0], "the whole clip is one attention"
    if spec is not None and spec.window_frames is None:
        held = "the cache keeps every frame (no rolling window)"
    elif spec is not None:
        span = min(span, spec.sink_frames + spec.window_frames + spec.chunk_frames)
        held = f"the rolling cache spans {span} (sinks + window + chunk)"
    if span > limit:
        hint = f"give at most {limit * patch[0]} frames"
        if spec is not None:
            hint += " or a smaller rolling window" if spec.window_frames else ", or convert with --window-frames N"
        raise UsageError(
            f"{where}--frames {frames}: the model's rotary positions cover {limit} latent frames (rope_max_seq_len "
            f"{limit}, temporal patch {patch[0]}), and {held}",
            hint,
        )
