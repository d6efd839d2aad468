"""Block-causal self-attention for video diffusion transformers, with a per-chunk key/value cache.

Frames are grouped in chunks of ``chunk_frames`` (latent frames after temporal
patching); a token sees the tokens of its own chunk and of the chunks before
it. The model is the stock diffusers model with one substitution: its
self-attention modules run :class:`BlockCausalProcessor` (cross-attention to
the condition is unchanged). Two modes:

- whole clip (no cache bound): the block-causal mask over every frame, the
  model's own rotary positions (training, the teacher-forced student);
- chunk by chunk (:func:`caching`): each call denoises one chunk; its queries
  attend to the cached keys and values of earlier chunks and to its own. Keys
  are cached un-rotated and rotated by their slot in the cache, so a rolling
  cache (``sink_frames`` kept from the start, the ``window_frames`` latest
  before the chunk) never needs a position past sinks + window + chunk. A call
  with ``write=True`` appends the chunk to the cache (Self-Forcing writes it
  with a clean re-run at t = 0 once the chunk is denoised).

Until a rolling cache drops its first frame the two modes are the same
computation; :func:`~streamify.eval.video.check_video_equivalence` checks both
against the stock diffusers model on growing prefixes of the clip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from streamify.arch import family_key, require
from streamify.errors import InputError, UsageError

CONFIG_KEY = "streamify_causal_video"
TIMESTEPS_KEY = "streamify_video_timesteps"  # the few-step schedule a student was trained with (self-forcing)


@dataclass(frozen=True)
class VideoSpec:
    """Chunks of ``chunk_frames`` latent frames; a rolling cache keeps ``sink_frames`` from the start and the
    ``window_frames`` latest (None: every frame)."""

    chunk_frames: int
    sink_frames: int = 0
    window_frames: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_frames < 1 or self.sink_frames < 0 or (self.window_frames is not None and self.window_frames < 1):
            raise UsageError(
                f"causal video: chunk_frames {self.chunk_frames}, sink_frames {self.sink_frames}, window_frames "
                f"{self.window_frames}: a chunk has at least 1 frame, sinks are 0 or more, a window at least 1",
                "use e.g. chunk_frames 3, sink_frames 0, window_frames null",
            )

    def allowed(self, query_frames: torch.Tensor, key_frames: torch.Tensor) -> torch.Tensor:
        """``[queries, keys]``: True where a token of frame ``q`` may attend to a token of frame ``k``."""
        q_chunk = torch.div(query_frames, self.chunk_frames, rounding_mode="floor")[:, None]
        k_chunk = torch.div(key_frames, self.chunk_frames, rounding_mode="floor")[None, :]
        allowed = k_chunk <= q_chunk
        if self.window_frames is not None:
            recent = key_frames[None, :] >= q_chunk * self.chunk_frames - self.window_frames
            allowed &= recent | (key_frames[None, :] < self.sink_frames)
        return allowed

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "config.json") -> VideoSpec:
        """Read a spec written by :meth:`to_json`; :class:`InputError` when it is malformed."""
        try:
            window = data.get("window_frames")
            return cls(
                int(data["chunk_frames"]), int(data.get("sink_frames", 0)), None if window is None else int(window)
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{where}: the '{CONFIG_KEY}' entry is malformed ({exc!r})",
                "re-create the artifact with streamify convert causal-video",
            ) from exc


@dataclass
class VideoCache:
    """Un-rotated keys and values ``[batch, tokens, heads, head_dim]`` per block, of the frames kept."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the keys and values held now."""
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)


class VideoController:
    """A causal video model's spec, its rotary embedding, the token grid of the current call and the cache."""

    def __init__(self, spec: VideoSpec, rope: nn.Module, patch: tuple[int, int, int]) -> None:
        self.spec, self.rope, self.patch = spec, rope, patch
        self.grid: tuple[int, int, int] | None = None  # frames, height, width in patches of the current call
        self.mask: torch.Tensor | None = None  # the whole clip's block-causal mask for the current call
        self.cache: VideoCache | None = None
        self.write = False
        self.tables: tuple | None = None  # ((height, width, device, dtype), cos, sin): the rotary table made last

    def start_call(self, latents: torch.Tensor, gradient_checkpointing: bool) -> None:
        """Before each forward: the token grid, and the clip's mask (whole clip) or the chunk's checks (cache)."""
        self.grid = tuple(n // p for n, p in zip(latents.shape[2:], self.patch, strict=True))
        frames, height, width = self.grid
        if self.cache is None:
            positions = torch.arange(frames, device=latents.device).repeat_interleave(height * width)
            self.mask = self.spec.allowed(positions, positions)
            return
        if frames != self.spec.chunk_frames:
            raise UsageError(
                f"a block-causal call over the cache takes one chunk of {self.spec.chunk_frames} latent frames, "
                f"got {frames}",
                f"give the latents of one chunk ({self.spec.chunk_frames * self.patch[0]} frames before patching)",
            )
        if gradient_checkpointing and torch.is_grad_enabled():
            raise UsageError(
                "gradient checkpointing recomputes blocks after the cache has changed",
                "turn gradient checkpointing off for chunk-by-chunk calls",
            )

    def rope_for(self, frames: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[1, frames * tokens_per_frame, 1, head_dim]`` for frame slots 0..frames-1: the first rows
        of one table, made again only for more frames or another frame size, device or dtype."""
        _, height, width = self.grid
        key, rows = (height, width, like.device, like.dtype), frames * height * width
        if self.tables is None or self.tables[0] != key or self.tables[1].shape[1] < rows:
            shape = (1, 1, frames * self.patch[0], height * self.patch[1], width * self.patch[2])
            cos, sin = self.rope(like.new_empty(shape))  # (only its shape is read)
            self.tables = (key, cos.to(like.device), sin.to(like.device))
        return self.tables[1][:, :rows], self.tables[2][:, :rows]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over interleaved pairs (even, odd), as Wan applies it; computed in the tables' dtype."""
    even, odd = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


class BlockCausalProcessor:
    """The self-attention of one block: block-causal over a whole clip, or one chunk over the cache."""

    def __init__(self, ctl: VideoController, index: int) -> None:
        self.ctl, self.index = ctl, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctl = self.ctl
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        _, height, width = ctl.grid
        per_frame = height * width
        if ctl.cache is None:
            mask = ctl.mask
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        else:
            held = ctl.cache.layers.get(self.index)
            if held is not None and (held[0].shape[0], held[0].shape[1] % per_frame) != (key.shape[0], 0):
                raise UsageError(
                    f"the cache holds a batch of {held[0].shape[0]} at another frame size than this call's",
                    "use one cache per stream, with the same batch and frame size in every call",
                )
            keys = key if held is None else torch.cat((held[0], key), dim=1)
            values = value if held is None else torch.cat((held[1], value), dim=1)
            if ctl.write:
                ctl.cache.layers[self.index] = self._kept(keys, values, per_frame)
            cos, sin = ctl.rope_for(keys.shape[1] // per_frame, query)
            query = _rotate(query, cos[:, -query.shape[1] :], sin[:, -query.shape[1] :])
            key, value, mask = _rotate(keys, cos, sin), values, None
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        out = out.flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    def _kept(self, keys: torch.Tensor, values: torch.Tensor, per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache keeps of ``keys``/``values`` for the next chunk: sinks + the latest window frames."""
        spec = self.ctl.spec
        frames = keys.shape[1] // per_frame
        if spec.window_frames is None or frames <= spec.sink_frames + spec.window_frames:
            return keys, values
        sink = spec.sink_frames * per_frame
        recent = spec.window_frames * per_frame
        return (
            torch.cat((keys[:, :sink], keys[:, -recent:]), dim=1),
            torch.cat((values[:, :sink], values[:, -recent:]), dim=1),
        )


def video_parts(model: nn.Module, where: str):
    """The family's causal-video layout (:class:`~streamify.arch.VideoAttention`), or InputError (exit 3)."""
    family = family_key(model.config) or type(model).__name__  # a model built in code has no _class_name yet
    return require(family, "causal_video", "block-causal video conversion", where).causal_video


def enable_causal_video(model: nn.Module, spec: VideoSpec, where: str = "the model") -> VideoController:
    """Make ``model``'s self-attention block-causal per ``spec`` (in place); returns its controller."""
    parts = video_parts(model, where)
    disable_causal_video(model)
    blocks = model.get_submodule(parts.blocks)
    ctl = VideoController(spec, model.get_submodule(parts.rope), tuple(model.config[parts.patch_key]))
    for index, block in enumerate(blocks):
        attention = block.get_submodule(parts.attention)
        if getattr(attention, "fused_projections", False):
            raise InputError(f"{where}: fused q/k/v projections", "unfuse them (attn.unfuse_projections())")
        attention.streamify_stock_processor = attention.processor
        attention.set_processor(BlockCausalProcessor(ctl, index))

    def start_call(module, args, kwargs):  # the module's own controller: a deep copy has its own
        latents = kwargs.get("hidden_states", args[0] if args else None)
        module.streamify_video.start_call(latents, getattr(module, "gradient_checkpointing", False))

    ctl.hook = model.register_forward_pre_hook(start_call, with_kwargs=True)
    model.streamify_video = ctl
    return ctl


def disable_causal_video(model: nn.Module) -> None:
    """Undo :func:`enable_causal_video`: the stock (bidirectional) processors come back."""
    ctl = getattr(model, "streamify_video", None)
    if ctl is None:
        return
    parts = video_parts(model, "the model")
    for block in model.get_submodule(parts.blocks):
        attention = block.get_submodule(parts.attention)
        attention.set_processor(attention.streamify_stock_processor)
        del attention.streamify_stock_processor
    ctl.hook.remove()
    model.streamify_video = None


@contextlib.contextmanager
def caching(model: nn.Module, cache: VideoCache, write: bool) -> Iterator[VideoCache]:
    """Calls of ``model`` inside denoise one chunk each over ``cache``; with ``write`` they also append it."""
    ctl = getattr(model, "streamify_video", None)
    if ctl is None:
        raise UsageError("the model is not block-causal", "convert it first: streamify convert causal-video")
    ctl.cache, ctl.write = cache, write
    try:
        yield cache
    finally:
        ctl.cache, ctl.write = None, False
