"""``builtin:shapes``: synthetic clips of one coloured shape moving in a straight line and bouncing off the walls.

The dynamics are known exactly, so a generated clip can be measured against
them: :func:`detect` finds the shape in each frame (centre of the lit pixels and
their mean colour), :func:`trajectory_error` compares the detected centres with
the path the label's direction gives from the first detected centre (bouncing
as the data does), :func:`colour_error` compares the detected colour with the
label's, and :func:`frechet_distance` compares simple per-clip statistics of
two sets of clips.

A clip is ``[frames, 3, size, size]`` in [0, 1] (black background); its label
names colour, shape and direction ("red square moving up-left"). Seeds below
:data:`HELDOUT_SEED` are the train split, seeds from it the held-out split, so
the two never share a clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streamify.errors import UsageError

SHAPES = ("square", "circle", "cross")
COLOURS = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.9, 0.2),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (0.95, 0.2, 0.9),
    "cyan": (0.1, 0.9, 0.95),
}
DIRECTIONS = {
    "up": (0, -1),
    "down": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
SIZES = (16, 32)
HELDOUT_SEED = 1_000_000
LIT = 0.25  # a pixel brighter than this (max over channels) belongs to the shape


@dataclass(frozen=True)
class Clip:
    """One clip, its label and the shape's true centre in every frame (x, y in pixels)."""

    frames: torch.Tensor  # [frames, 3, size, size]
    shape: str
    colour: str
    direction: str
    centres: torch.Tensor  # [frames, 2]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape} moving {self.direction}"


def radius(size: int) -> int:
    """Half the shape's side for a frame of ``size`` pixels."""
    return max(2, size // 8)


def bounce_path(start: torch.Tensor, direction: str, frames: int, size: int, speed: float = 1.0) -> torch.Tensor:
    """Centres over ``frames`` frames from ``start``, moving ``speed`` pixels a frame along ``direction`` on each
    axis and reflecting off the walls (the shape stays inside the frame)."""
    low, high = radius(size) - 0.5, size - radius(size) - 0.5
    step = torch.tensor(DIRECTIONS[direction], dtype=torch.float64) * speed
    position = start.to(torch.float64).clone()
    out = []
    for _ in range(frames):
        out.append(position.clone())
        position += step
        for axis in range(2):  # reflect whatever went past a wall
            if position[axis] < low:
                position[axis], step[axis] = 2 * low - position[axis], -step[axis]
            elif position[axis] > high:
                position[axis], step[axis] = 2 * high - position[axis], -step[axis]
    return torch.stack(out).float()


def _mask(shape: str, centre: torch.Tensor, size: int) -> torch.Tensor:
    """The pixels the shape covers, ``[size, size]`` booleans."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dx, dy = xs - centre[0], ys - centre[1]
    r = radius(size)
    if shape == "square":
        return (dx.abs() <= r - 0.5) & (dy.abs() <= r - 0.5)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    return ((dx.abs() <= r - 0.5) & (dy.abs() <= 0.5 + size // 32)) | (
        (dy.abs() <= r - 0.5) & (dx.abs() <= 0.5 + size // 32)
    )


def start_positions(size: int) -> list[float]:
    """The coordinates a shape's centre can start at on either axis (wall to wall); :func:`make_clip` draws one
    per axis."""
    return [position - 0.5 for position in range(radius(size), size - radius(size) + 1)]


def draw_clip(shape: str, colour: str, direction: str, start: tuple[float, float], frames: int, size: int) -> Clip:
    """The clip of one shape and colour moving along ``direction`` from ``start`` (x, y in pixels)."""
    centres = bounce_path(torch.tensor(start, dtype=torch.float32), direction, frames, size)
    video = torch.zeros(frames, 3, size, size)
    rgb = torch.tensor(COLOURS[colour])[:, None]
    for index, centre in enumerate(centres):
        mask = _mask(shape, centre, size)
        video[index][:, mask] = rgb
    return Clip(video, shape, colour, direction, centres)


def make_clip(seed: int, frames: int = 16, size: int = 16) -> Clip:
    """The clip of ``seed``: shape, colour, direction and start drawn from it, then drawn frame by frame."""
    if size not in SIZES:
        raise UsageError(f"builtin:shapes: frames are {' or '.join(map(str, SIZES))} pixels, not {size}", "use 16")
    rng = torch.Generator().manual_seed(seed)

    def pick(options) -> str:
        options = list(options)
        return options[int(torch.randint(len(options), (), generator=rng))]

    shape, colour, direction = pick(SHAPES), pick(COLOURS), pick(DIRECTIONS)
    r = radius(size)
    start = torch.randint(r, size - r + 1, (2,), generator=rng).float() - 0.5  # one of start_positions(size)
    return draw_clip(shape, colour, direction, (float(start[0]), float(start[1])), frames, size)


def shapes_clips(split: str, count: int, frames: int = 16, size: int = 16) -> list[Clip]:
    """``count`` clips of the ``train`` or ``heldout`` split (their seeds never overlap)."""
    if split not in ("train", "heldout"):
        raise UsageError(f"builtin:shapes has the splits train and heldout, not {split}", "use train or heldout")
    first = 0 if split == "train" else HELDOUT_SEED
    return [make_clip(first + i, frames, size) for i in range(count)]


def clip_latents(clip: Clip) -> torch.Tensor:
    """A clip as a pixel-space denoiser reads it: ``[1, 3, frames, size, size]`` in [-1, 1]."""
    return (clip.frames.permute(1, 0, 2, 3) * 2 - 1)[None]


def latents_frames(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`clip_latents` for one clip: ``[frames, 3, size, size]`` in [0, 1]."""
    return ((latents[0].permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class Label:
    """What a clip's label names."""

    shape: str
    colour: str
    direction: str


def parse_label(text: str) -> Label:
    """``"red square moving up-left"`` as a :class:`Label`; UsageError naming the choices when it is not one."""
    words = text.lower().split()
    colour, shape, moving, direction = words if len(words) == 4 else ("", "", "", "")
    if colour in COLOURS and shape in SHAPES and moving == "moving" and direction in DIRECTIONS:
        return Label(shape, colour, direction)
    raise UsageError(
        f"'{text}' is not a builtin:shapes label",
        f"write 'COLOUR SHAPE moving DIRECTION': colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; "
        f"directions {', '.join(DIRECTIONS)}",
    )


def label_condition(clip: Clip | Label, tokens: int, dim: int) -> torch.Tensor:
    """A clip's label as ``[tokens, dim]`` condition tokens: one token each for colour, shape and direction, a
    one-hot in its own slice of ``dim``; the rest zeros."""
    need = len(COLOURS) + len(SHAPES) + len(DIRECTIONS)
    if tokens < 3 or dim < need:
        raise UsageError(
            f"builtin:shapes conditions need at least 3 tokens of {need} dimensions, the model takes {tokens} x {dim}",
            "give the denoiser a text_dim of at least 17",
        )
    condition = torch.zeros(tokens, dim)
    offsets = (0, len(COLOURS), len(COLOURS) + len(SHAPES))
    for token, (options, value, offset) in enumerate(
        zip((COLOURS, SHAPES, DIRECTIONS), (clip.colour, clip.shape, clip.direction), offsets, strict=True)
    ):
        condition[token, offset + list(options).index(value)] = 1.0
    return condition


def detect(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame of ``[frames, 3, H, W]``: the centre (x, y) of the lit pixels and their mean colour (NaN where
    nothing is lit)."""
    lit = frames.clamp(0, 1).amax(dim=1) > LIT  # [frames, H, W]
    size_y, size_x = frames.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(size_y), torch.arange(size_x), indexing="ij")
    count = lit.sum(dim=(1, 2)).float()
    centre = torch.stack(((lit * xs).sum(dim=(1, 2)), (lit * ys).sum(dim=(1, 2))), dim=1) / count[:, None]
    colour = (frames.clamp(0, 1) * lit[:, None]).sum(dim=(2, 3)) / count[:, None]
    return centre, colour


def trajectory_error(frames: torch.Tensor, direction: str) -> float:
    """Mean distance in pixels between the detected centres and the path the data's rule gives for
    ``direction`` from the first detected centre; a frame where nothing is detected counts the frame's size."""
    centre, _ = detect(frames)
    size = frames.shape[-1]
    if torch.isnan(centre[0]).any():
        return float(size)
    rule = bounce_path(centre[0], direction, frames.shape[0], size)
    error = (centre - rule).norm(dim=1)
    return float(torch.where(torch.isnan(error), torch.tensor(float(size)), error).mean())


def colour_error(frames: torch.Tensor, colour: str) -> float:
    """Mean distance (RGB in [0, 1]) between each frame's detected colour and the label's; an empty frame counts
    the largest distance, sqrt(3)."""
    _, detected = detect(frames)
    error = (detected - torch.tensor(COLOURS[colour])).norm(dim=1)
    return float(torch.where(torch.isnan(error), torch.tensor(math.sqrt(3)), error).mean())


def clip_features(frames: torch.Tensor) -> torch.Tensor:
    """Statistics of a clip for :func:`frechet_distance`: mean colour, lit fraction, mean speed and its spread."""
    centre, colour = detect(frames)
    lit = (frames.clamp(0, 1).amax(dim=1) > LIT).float().mean(dim=(1, 2))
    steps = (centre[1:] - centre[:-1]).norm(dim=1)
    steps = torch.nan_to_num(steps, nan=float(frames.shape[-1]))
    return torch.cat(
        (torch.nan_to_num(colour, nan=0.0).mean(0), lit.mean()[None], steps.mean()[None], steps.std()[None])
    )


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature rows (``[n, d]`` each, n > 1)."""
    first, second = first.double(), second.double()
    mean = (first.mean(0) - second.mean(0)).pow(2).sum()
    a, b = torch.cov(first.T), torch.cov(second.T)
    root_a = _sqrtm(a)
    cross = _sqrtm(root_a @ b @ root_a)
    return float(mean + torch.trace(a + b - 2 * cross))


def _sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
