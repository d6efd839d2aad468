"""``streamify generate`` for a video denoiser: its condition, the generation, the files and the summary."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import torch

from streamify.errors import InputError, UsageError
from streamify.runtime.causal_video import TIMESTEPS_KEY
from streamify.runtime.video_generate import VideoRequest, check_output


def video_request(
    config, frames: int, height: int, width: int, timesteps: str | None, sample_steps, shift, seed, euler, guidance
) -> VideoRequest:
    """The request: ``--timesteps`` read as decreasing numbers from 1000 down to above 0 (default: the schedule
    the student was trained with, else 1000,750,500,250); the clip in whole patches of the model."""
    if timesteps is None:
        levels = tuple(config.get(TIMESTEPS_KEY) or (1000, 750, 500, 250))
    else:
        try:
            levels = tuple(float(t) for t in timesteps.split(","))
        except ValueError:
            levels = ()
    if not all(map(math.isfinite, levels)) or not levels or levels[0] != 1000 or levels[-1] <= 0:
        levels = ()
    if not levels or any(b >= a for a, b in pairwise(levels)):
        raise UsageError(f"--timesteps {timesteps}: not decreasing numbers from 1000 down", "e.g. 1000,750,500,250")
    patch = config["patch_size"]
    if frames % patch[0] or height % patch[1] or width % patch[2]:
        raise UsageError(
            f"--frames {frames} --height {height} --width {width}: not whole patches of {' x '.join(map(str, patch))}",
            "give multiples of the model's patch size (frames, height, width)",
        )
    return VideoRequest(frames, height, width, levels, sample_steps, shift, seed, euler, guidance)


def video_condition(model, prompt: str | None, condition_file: Path | None) -> torch.Tensor:
    """``[1, tokens, text_dim]``: a ``builtin:shapes`` label for a pixel model trained on it, or the
    ``condition`` tensor ``[tokens, text_dim]`` of a .safetensors file (text-encoder states of a prompt)."""
    from streamify.data.shapes import label_condition, parse_label
    from streamify.kinds.denoiser import SHAPES_TOKENS
    from streamify.runtime.video_generate import is_pixel_model

    dim = model.config["text_dim"]
    if condition_file is not None:
        from streamify.io.safetensors_file import read_named_tensor

        hint = "write the prompt's text-encoder states as a 'condition' tensor [tokens, text_dim] in a .safetensors"
        condition = read_named_tensor(condition_file, "condition", hint)
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
            "--prompt: this denoiser works in latents and reads its text encoder's states",
            "encode the prompt with streamify encode-prompts (Wan's UMT5) and pass the file with --condition FILE",
        )
    return label_condition(parse_label(prompt), SHAPES_TOKENS, dim)[None]


def run_video(
    checkpoint, out, *, prompt, condition_file, output, request, vae: Path | None = None, fps: int = 8
) -> None:
    """Generate, write and report one clip (frames through ``vae`` for a latent model)."""
    from streamify.data.prompt_encoding import read_unconditional
    from streamify.runtime.video_generate import generate_video, is_pixel_model, load_vae, write_video
    from streamify.runtime.video_sampling import negative_condition

    if output is None:
        raise UsageError("video generation writes a folder", "pass -o FOLDER")
    check_output(output)
    model = checkpoint.model
    if vae is not None and is_pixel_model(model):
        raise UsageError("--vae: this denoiser works in RGB pixels, its frames need no VAE", "leave out --vae")
    decoder = load_vae(vae, model) if vae is not None else None
    condition = video_condition(model, prompt, condition_file)
    guided_by_file = condition_file is not None and request.guidance != 1.0
    negative = read_unconditional(condition_file, condition.shape[1:]) if guided_by_file else None
    with negative_condition(model, negative):
        latents, result = generate_video(model, condition, request, progress=out)
    if request.guidance != 1.0:
        result["unconditional"] = "the file's negative prompt" if negative is not None else "zero tokens"
    result["files"] = write_video(latents, model, output, decoder, fps)
    result["output"] = str(output)
    out.result(
        result,
        lambda console, data: console.print(
            f"{data['frames']} frames ({data['mode']}) in {data['seconds']} s, {data['frames_per_s']} frames/s, "
            f"{data['evaluations_per_frame']} evaluations a frame"
            + (f" (guidance {data['guidance']:g})" if data["guidance"] != 1.0 else "")
            + (f", cache {data['cache_bytes_max']:,} bytes at most" if "cache_bytes_max" in data else "")
            + f": {data['output']}",
            markup=False,
            highlight=False,
        ),
    )
