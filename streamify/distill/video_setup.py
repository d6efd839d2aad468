"""What the video distillation stages share: their clip and data settings, the conditions, and the teacher.

Conditions (the prompts' encoder states) come from the run's ``--data``:

- ``builtin:shapes``: the labels of ``builtin:shapes`` clips as condition tokens
  (:func:`~streamify.data.shapes.label_condition`), train and held-out seeds;
- ``builtin:random-latents``: seeded Gaussian condition tokens (a smoke test);
- a ``.safetensors`` file with a ``conditions`` tensor ``[prompts, tokens, text_dim]``:
  text-encoder states computed beforehand (for Wan, UMT5 states of the prompts, which
  ``streamify encode-prompts`` writes);
  the last tenth (at least one) is held out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from streamify.distill.trainer import TrainParams
from streamify.errors import InputError, UsageError
from streamify.io.safetensors_file import read_named_tensor
from streamify.kinds.denoiser import RANDOM_LATENTS, SHAPES
from streamify.progress import SILENT, Progress
from streamify.runtime.causal_video import CONFIG_KEY
from streamify.runtime.video_sampling import check_rotary_range, chunk_length

COMPATIBLE_KEYS = ("in_channels", "out_channels", "patch_size", "text_dim")  # what teacher and student must share
TRAINING_BYTES_PER_PARAM = 12  # an fp32 gradient and AdamW's two moments


class VideoDistillParams(TrainParams):
    """Settings shared by ``distill.ode_init`` and ``distill.self_forcing``."""

    teacher: str | None = Field(None, description="the bidirectional teacher MODEL (default: see the stage)")
    samples: int = Field(64, ge=1, description="training conditions (prompts)")
    heldout_samples: int = Field(8, ge=1, description="held-out conditions for the stage's held-out loss")
    frames: int = Field(6, ge=1, description="latent frames of a training clip (a whole number of chunks)")
    height: int = Field(16, ge=1, description="latent height of a training clip")
    width: int = Field(16, ge=1, description="latent width of a training clip")
    condition_tokens: int = Field(4, ge=1, description="condition tokens (builtin data; a file sets its own)")
    guidance: float = Field(
        1.0, ge=0, description="the teacher's classifier-free guidance scale (1: none; unconditional: zero tokens)"
    )


def clip_shape(model: nn.Module, params: VideoDistillParams, where: str) -> tuple[int, int, int, int]:
    """``(channels, frames, height, width)`` of a training clip; UsageError when the frames are not whole chunks
    or a side is not a whole number of patches."""
    step = chunk_length(model)
    patch = model.config["patch_size"]
    if params.frames % step or params.height % patch[1] or params.width % patch[2]:
        raise UsageError(
            f"{where}: a clip of {params.frames} x {params.height} x {params.width} latents is not whole chunks "
            f"of {step} frames and whole {patch[1]} x {patch[2]} patches",
            f"set frames to a multiple of {step}, height and width to multiples of the patch",
        )
    # the teacher (and critic) score whole clips: one attention over every frame
    check_rotary_range(model.config, params.frames, params.height, params.width, where=f"{where}: ")
    return model.config["in_channels"], params.frames, params.height, params.width


def conditions(data: str, config, split: str, count: int, tokens: int, progress: Progress = SILENT) -> torch.Tensor:
    """``[count, tokens, text_dim]`` conditions of ``split`` (train or heldout) from ``data`` (module doc); a file
    with fewer prompts than ``count`` has them repeated, which is logged."""
    dim = config["text_dim"]
    if data == SHAPES:
        from streamify.data.shapes import label_condition, shapes_clips

        return torch.stack([label_condition(clip, tokens, dim) for clip in shapes_clips(split, count, 1)])
    if data == RANDOM_LATENTS:
        generator = torch.Generator().manual_seed(0 if split == "train" else 1)
        return torch.randn(count, tokens, dim, generator=generator)
    return _file_conditions(Path(data), split, count, dim, progress)


def train_and_heldout(data: str, config, params: VideoDistillParams, progress: Progress) -> tuple:
    """The ``samples`` training and ``heldout_samples`` held-out conditions of a stage (:func:`conditions`)."""
    return (
        conditions(data, config, "train", params.samples, params.condition_tokens, progress),
        conditions(data, config, "heldout", params.heldout_samples, params.condition_tokens, progress),
    )


def negative_tokens(data: str, conditions: torch.Tensor) -> torch.Tensor | None:
    """The ``unconditional`` states of a conditions file (``encode-prompts --negative``), which guided passes
    take as their unconditional branch; None for built-in data or a file without them."""
    if data in (SHAPES, RANDOM_LATENTS):
        return None
    from streamify.data.prompt_encoding import read_unconditional

    return read_unconditional(Path(data), conditions.shape[1:])


def _file_conditions(path: Path, split: str, count: int, dim: int, progress: Progress) -> torch.Tensor:
    hint = "give a .safetensors file with a 'conditions' tensor [prompts, tokens, text_dim], or builtin:shapes"
    if path.suffix != ".safetensors" or not path.is_file():
        raise InputError(f"--data {path}: not a .safetensors file of conditions, nor {SHAPES} / {RANDOM_LATENTS}", hint)
    table = read_named_tensor(path, "conditions", hint)
    if table.ndim != 3 or table.shape[2] != dim or table.shape[0] < 2:
        raise InputError(
            f"{path}: 'conditions' is {list(table.shape)}; the model needs [prompts >= 2, tokens, {dim}]", hint
        )
    held = max(1, table.shape[0] // 10)
    rows = table[:-held] if split == "train" else table[-held:]
    if rows.shape[0] < count:
        progress.log(f"{path}: {rows.shape[0]} {split} prompts for {count} samples: each is used more than once")
    return rows[torch.arange(count) % rows.shape[0]]  # repeated when fewer than asked


def check_teacher(teacher: nn.Module, student: nn.Module, where: str) -> None:
    """The teacher is bidirectional and reads and writes what the student does, else InputError (exit 3)."""
    if getattr(teacher, "streamify_video", None) is not None or CONFIG_KEY in teacher.config:
        raise InputError(
            f"{where}: the teacher is block-causal; it must be the bidirectional model the student came from",
            "name the bidirectional teacher (teacher: MODEL)",
        )
    if type(teacher) is not type(student):
        raise InputError(
            f"{where}: the teacher is a {type(teacher).__name__}, the student a {type(student).__name__}",
            "use a teacher of the student's architecture",
        )
    differ = [key for key in COMPATIBLE_KEYS if _listed(teacher.config[key]) != _listed(student.config[key])]
    if differ:
        shown = ", ".join(f"{k} {teacher.config[k]} vs {student.config[k]}" for k in differ)
        raise InputError(f"{where}: teacher and student differ in {shown}", "use the student's own teacher")


def _listed(value) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def require_causal_student(student: nn.Module, stage: str, where: str, hint: str) -> None:
    """UsageError unless ``student`` is block-causal (``convert.causal_video`` ran)."""
    if getattr(student, "streamify_video", None) is None:
        raise UsageError(f"{where}: {stage} trains a block-causal student, and the model is bidirectional", hint)


def load_teacher(spec: str, student: nn.Module, device, progress, stage: str) -> nn.Module:
    """The teacher ``spec`` of ``stage``, loaded frozen and checked against ``student`` (:func:`check_teacher`)."""
    from streamify.io.load import load_teacher_checkpoint

    teacher = freeze(load_teacher_checkpoint(spec, stage, device=str(device), progress=progress).model)
    check_teacher(teacher, student, f"{stage} teacher {spec}")
    return teacher


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring grad."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
