"""Flow-matching training of a video denoiser on clips: a bidirectional teacher, or a diffusion-forced causal one.

The loss is the denoiser kind's: ``x_s = (1 - s) x_0 + s e``, the model predicts
``e - x_0`` (MSE). A bidirectional model gets one level per clip. A block-causal
model gets one level per chunk, drawn independently (diffusion forcing, Chen
et al. 2024): each chunk learns to denoise with earlier chunks at any noise
level, the baseline that Self-Forcing's own rollouts improve on.

With ``condition_dropout`` a share of the clips is trained with all-zero
condition tokens, the unconditional model that classifier-free guidance
(:func:`streamify.runtime.video_sampling.velocity`) steers away from.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamify.distill.trainer import TrainParams, TrainResult, train
from streamify.progress import SILENT, Progress
from streamify.runtime.video_sampling import chunk_length, noised, velocity


def flow_matching_loss(
    model: nn.Module, clips: torch.Tensor, condition: torch.Tensor, condition_dropout: float = 0.0
) -> torch.Tensor:
    """The flow-matching loss of ``clips`` ``[batch, C, F, H, W]``: a level per clip, or per chunk when the model
    is block-causal; each clip's condition is zeroed with probability ``condition_dropout``."""
    batch = clips.shape[0]
    if condition_dropout > 0:
        kept = torch.rand(batch, device=condition.device) >= condition_dropout
        condition = torch.where(kept[:, None, None], condition, torch.zeros_like(condition))
    if getattr(model, "streamify_video", None) is not None:
        step = chunk_length(model)
        grid_frames = step // model.streamify_video.patch[0]
        sigma = torch.rand(batch, clips.shape[2] // step, device=clips.device).repeat_interleave(grid_frames, dim=1)
    else:
        sigma = torch.rand(batch, device=clips.device)
    noise = torch.randn_like(clips)
    return F.mse_loss(velocity(model, noised(clips, noise, sigma), condition, sigma), noise - clips)


def train_on_clips(
    model: nn.Module,
    clips: torch.Tensor,
    condition: torch.Tensor,
    params: TrainParams,
    *,
    seed: int,
    condition_dropout: float = 0.0,
    checkpoint_dir: Path | None = None,
    progress: Progress = SILENT,
) -> TrainResult:
    """Train every weight of ``model`` with :func:`flow_matching_loss` on ``clips`` and their ``condition`` rows."""
    device = next(model.parameters()).device
    for param in model.parameters():
        param.requires_grad_(True)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        rows = batch[:, 0].cpu()
        return flow_matching_loss(model, clips[rows].to(device), condition[rows].to(device), condition_dropout)

    try:
        return train(
            model,
            torch.arange(clips.shape[0])[:, None],
            loss_fn,
            params,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
    finally:
        for param in model.parameters():
            param.requires_grad_(False)
