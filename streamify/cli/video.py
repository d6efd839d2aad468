"""``streamify generate`` for a video denoiser: its condition, the generation, the files and the summary."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import torch

from streamify.errors import InputError, UsageError
from streamify.runtime.video_generate import VideoRequest


def video_request(frames, height, width, timesteps: str, sample_steps, shift, seed, euler) -> VideoRequest:
    """The request, with ``--timesteps`` read as decreasing numbers from 1000 down to above 0."""
    try:
        levels = tuple(float(t) for t in timesteps.split(","))
    except ValueError:
        levels = ()
    if not levels or levels[0] != 1000 or any(b >= a for a, b in pairwise(levels)) or levels[-1] <= 0:
        raise UsageError(f"--timesteps {timesteps}: not decreasing numbers from 1000 down", "e.g. 1000,750,500,250")
    return VideoRequest(frames, height, width, levels, sample_steps, shift, seed, euler)


def video_condition(model, prompt: str | None, condition_file: Path | None) -> torch.Tensor:
    """``[1, tokens, text_dim]``: a ``builtin:shapes`` label for a pixel model trained on it, or the
    ``condition`` tensor ``[tokens, text_dim]`` of a .safetensors file (text-encoder states of a prompt)."""
    from streamify.data.shapes import label_condition, parse_label
    from streamify.kinds.denoiser import SHAPES_TOKENS
    from streamify.runtime.video_generate import is_pixel_model

    dim = model.config["text_dim"]
    if condition_file is not None:
        from safetensors import SafetensorError, safe_open

        hint = "write the prompt's text-encoder states as a 'condition' tensor [tokens, text_dim] in a .safetensors"
        try:
            with safe_open(str(condition_file), "pt") as handle:
                condition = handle.get_tensor("condition").float()
        except (SafetensorError, OSError, KeyError) as exc:
            raise InputError(f"{condition_file}: cannot read a 'condition' tensor ({exc})", hint) from exc
        if condition.ndim != 2 or condition.shape[1] != dim:
            raise InputError(
                f"{condition_file}: 'condition' is {list(condition.shape)}, the model needs [tokens, {dim}]", hint
            )
        return condition[None]
    if prompt is None:
        raise UsageError(
            "a video denoiser needs a condition", "pass --prompt LABEL (builtin:shapes) or --condition FILE"
        )
    if not is_pixel_model(model):
        raise UsageError(
            "--prompt: this denoiser works in latents and reads its text encoder's states; streamify does not run that",
            "encode the prompt with the model's text encoder and pass it with --condition FILE",
        )
    return label_condition(parse_label(prompt), SHAPES_TOKENS, dim)[None]


def run_video(checkpoint, out, *, prompt, condition_file, output, request) -> None:
    """Generate, write and report one clip."""
    from streamify.runtime.video_generate import generate_video, write_video

    if output is None:
        raise UsageError("video generation writes a folder", "pass -o FOLDER")
    model = checkpoint.model
    condition = video_condition(model, prompt, condition_file)
    latents, result = generate_video(model, condition, request, progress=out)
    result["files"] = write_video(latents, model, output)
    result["output"] = str(output)
    out.result(
        result,
        lambda console, data: console.print(
            f"{data['frames']} frames ({data['mode']}) in {data['seconds']} s, {data['frames_per_s']} frames/s, "
            f"{data['evaluations_per_frame']} evaluations a frame"
            + (f", cache {data['cache_bytes_max']:,} bytes at most" if "cache_bytes_max" in data else "")
            + f": {data['output']}",
            markup=False,
            highlight=False,
        ),
    )
