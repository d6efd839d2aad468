"""Diffusion denoisers (diffusers transformers): noisy latents + noise level + condition in, velocity out.

The eval draws seeded latents and conditions of the shapes the family declares
(:mod:`streamify.arch`, ``denoiser_inputs``; ``--data builtin:random-latents``),
or, for a denoiser that works in RGB pixels, held-out clips of ``builtin:shapes``
with their labels as conditions (:mod:`streamify.data.shapes`); it noises each
at a seeded level and scores the flow-matching loss: with
``x_t = (1 - s) x_0 + s e`` at ``t = 1000 s``, the model predicts ``e - x_0``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamify.arch import arch_for, family_key
from streamify.errors import UsageError
from streamify.kinds import Kind

RANDOM_LATENTS = "builtin:random-latents"
SHAPES = "builtin:shapes"
SHAPES_FRAMES, SHAPES_SIZE, SHAPES_TOKENS = 8, 16, 4  # held-out clips for the eval
EVAL_SEED = 0  # the same latents, noise and levels for every model of a family


class Denoiser(Kind):
    name = "denoiser"
    summary = "diffusion denoiser (diffusers): latents + noise level + condition -> velocity; flow-matching loss"
    default_data = RANDOM_LATENTS
    compares_to_source = True
    order = 30

    def matches(self, model: Any) -> bool:
        return type(model).__module__.startswith("diffusers.") and bool(
            getattr(arch_for(family_key(model.config)), "denoiser_inputs", None)
        )

    def eval_data(self, checkpoint: Any, spec: Any) -> Any:
        data = spec.data or self.default_data
        config = checkpoint.model.config
        generator = torch.Generator().manual_seed(EVAL_SEED)
        if data == SHAPES:
            samples = _shapes_inputs(config, spec.max_items)
        elif data == RANDOM_LATENTS:
            samples = arch_for(family_key(config)).denoiser_inputs(config, spec.max_items, generator)
        else:
            raise UsageError(
                f"--data {data}: a denoiser is evaluated on {RANDOM_LATENTS} (seeded latents of its shapes) or "
                f"{SHAPES} (held-out synthetic clips, for a denoiser in RGB pixels)",
                f"pass --data {RANDOM_LATENTS} or {SHAPES}, or leave --data out",
            )
        for sample in samples:
            sample["noise"] = torch.randn(sample["latents"].shape, generator=generator)
            sample["sigma"] = torch.rand((), generator=generator).item() * 0.98 + 0.01
        return samples

    @torch.inference_mode()
    def score(self, checkpoint: Any, data: Any, spec: Any, progress: Any) -> tuple[dict, Any]:
        model = checkpoint.model
        device, dtype = next(model.parameters()).device, model.dtype  # diffusers skips the fp32-kept tensors here
        losses, predictions = [], []
        for sample in progress.track(data, "denoising", total=len(data)):
            sigma = sample["sigma"]
            noisy = (1 - sigma) * sample["latents"] + sigma * sample["noise"]
            predicted = (
                model(
                    hidden_states=noisy.to(device, dtype),
                    timestep=torch.tensor([1000 * sigma], device=device),
                    encoder_hidden_states=sample["condition"].to(device, dtype),
                    return_dict=False,
                )[0]
                .float()
                .cpu()
            )
            losses.append(F.mse_loss(predicted, sample["noise"] - sample["latents"]).item())
            predictions.append(predicted.flatten())
        metrics = {"denoising_loss": sum(losses) / len(losses), "samples": len(losses), "objective": "flow matching"}
        return metrics, torch.stack(predictions)

    def compare(self, outputs: Any, reference: Any) -> dict:
        error = (outputs.double() - reference.double()).norm() / reference.double().norm()
        cosine = F.cosine_similarity(outputs.double(), reference.double(), dim=-1)
        return {"relative_error_to_reference": error.item(), "cosine_to_reference_min": cosine.min().item()}


KINDS = (Denoiser(),)


def _shapes_inputs(config: Any, count: int) -> list[dict]:
    """Held-out ``builtin:shapes`` clips as latents in [-1, 1] with their labels as conditions."""
    from streamify.data.shapes import clip_latents, label_condition, shapes_clips

    channels = (config["in_channels"], config["out_channels"])
    if channels != (3, 3):
        raise UsageError(
            f"--data {SHAPES}: the clips are RGB pixels, and this denoiser reads and writes {channels} channels",
            f"use {RANDOM_LATENTS} for a latent-space denoiser",
        )
    clips = shapes_clips("heldout", count, SHAPES_FRAMES, SHAPES_SIZE)
    return [
        {"latents": clip_latents(clip), "condition": label_condition(clip, SHAPES_TOKENS, config["text_dim"])[None]}
        for clip in clips
    ]
