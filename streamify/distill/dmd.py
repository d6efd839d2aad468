"""Distribution matching distillation (DMD, DMD2): the generator's loss and its critic's.

The frozen teacher scores the "real" distribution and a critic (initialised
from the teacher) learns the generator's own, "fake", one with the
flow-matching loss on the generator's samples. For a generated clip ``x``
noised to a random level, the difference of the two clean predictions points
from the real distribution towards the fake one; normalised by the mean
distance of ``x`` from the real prediction, it is the gradient that
``½·MSE(x, stopgrad(x − gradient))`` hands to ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamify.runtime.video_sampling import noised, predict_clean, velocity


def _levels(batch: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(batch, device=device) * (high - low) + low


def dmd_loss(
    clip: torch.Tensor,
    condition: torch.Tensor,
    teacher: nn.Module,
    critic: nn.Module,
    low: float,
    high: float,
    guidance: float = 1.0,
) -> torch.Tensor:
    """The generator's DMD loss for ``clip`` (with gradient) at a random level in [``low``, ``high``]; the teacher's
    real score is guided by ``guidance`` (DMD, Self-Forcing: the student learns the guided distribution), the
    critic's is not."""
    with torch.no_grad():
        sigma = _levels(clip.shape[0], low, high, clip.device)
        noisy = noised(clip.detach(), torch.randn_like(clip), sigma)
        real = predict_clean(teacher, noisy, condition, sigma, guidance)
        fake = predict_clean(critic, noisy, condition, sigma)
        scale = (clip.detach() - real).abs().mean(dim=tuple(range(1, clip.ndim)), keepdim=True)
        gradient = torch.nan_to_num((fake - real) / scale.clamp_min(1e-8))
    return 0.5 * F.mse_loss(clip.float(), (clip.detach() - gradient).float())


def critic_loss(critic: nn.Module, clip: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """The critic's flow-matching loss on generated ``clip`` (no gradient to the generator), at a uniform level."""
    clip = clip.detach()
    sigma = _levels(clip.shape[0], 0.0, 1.0, clip.device)
    noise = torch.randn_like(clip)
    return F.mse_loss(velocity(critic, noised(clip, noise, sigma), condition, sigma), noise - clip)
