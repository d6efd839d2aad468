"""A chunk-causal Whisper encoder: block-causal self-attention over 20 ms frames, run chunk by chunk with a cache.

Whisper's encoder sees its whole 30-second input at once. Made chunk-causal
(CarelessWhisper), a frame attends to the frames of its own chunk and of the
chunks before it, so the encoder output of a chunk never changes once the
chunk has been heard and can be computed as audio arrives:

- :func:`enable_chunk_causal` gives the stock transformers encoder that mask
  (an attention function registered with transformers, used by the encoder's
  self-attention layers only; the decoder keeps its own): one forward under
  the mask is the reference, and the form training uses.
- :class:`StreamingEncoder` runs the encoder's own modules on each new chunk
  only, caching every layer's keys and values, and gives the same frames.

The convolution front end (kernel 3, then kernel 3 stride 2, over 10 ms mel
frames) reads one mel frame past a chunk's last encoder frame, centred on the
next chunk's first sample; its STFT window reaches 12.5 ms further, so a
chunk is computed once 12.5 ms of the next one have been heard (the
look-ahead; at the end of the input the front end's zero padding stands in,
as in the offline forward). Given the same mel frames, the cached encoder's
output equals the masked forward's; the runtime's mel differs from a
whole-clip mel only by its log floor, taken over the audio heard so far.
Frame ``t`` keeps its absolute position embedding, so a stream is at most
30 s (1,500 frames), Whisper's window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from streamify.errors import UsageError

FRAME_MS = 20  # one encoder frame: two 10 ms mel frames
IMPLEMENTATION = "streamify_chunk_causal"
CONFIG_KEY = "streamify_chunk_causal"


@dataclass(frozen=True)
class ChunkSpec:
    """Chunks of ``chunk_frames`` encoder frames (20 ms each); the first has ``first_extra`` more frames."""

    chunk_frames: int
    first_extra: int = 0

    @classmethod
    def from_ms(cls, chunk_ms: int, first_extra_ms: int = 0) -> ChunkSpec:
        """A spec from milliseconds, which must be whole encoder frames (multiples of 20 ms)."""
        for name, value in (("--chunk-ms", chunk_ms), ("--first-chunk-extra-ms", first_extra_ms)):
            if value % FRAME_MS or value < (FRAME_MS if name == "--chunk-ms" else 0):
                raise UsageError(
                    f"{name} {value}: Whisper's encoder frames are {FRAME_MS} ms, so a chunk is a whole number of them",
                    f"use a multiple of {FRAME_MS} ms, e.g. 300",
                )
        return cls(chunk_frames=chunk_ms // FRAME_MS, first_extra=first_extra_ms // FRAME_MS)

    def chunk_of(self, frames: torch.Tensor) -> torch.Tensor:
        """The chunk index of each frame index."""
        shifted = (frames - self.first_extra).clamp(min=0)
        return torch.div(shifted, self.chunk_frames, rounding_mode="floor")

    def bounds(self, total: int) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of the chunks covering ``total`` frames (the last may be partial)."""
        edges, start = [], 0
        stop = min(total, self.first_extra + self.chunk_frames)
        while start < total:
            edges.append((start, stop))
            start, stop = stop, min(total, stop + self.chunk_frames)
        return edges

    def to_json(self) -> dict:
        """The spec as stored in the manifest and config (frames and milliseconds)."""
        return {**asdict(self), "chunk_ms": self.chunk_frames * FRAME_MS, "first_extra_ms": self.first_extra * FRAME_MS}


def _chunk_causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``streamify_chunk_causal`` attention function: block-causal for modules that carry a spec."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spec = getattr(module, "streamify_chunks", None)
    if spec is not None and query.shape[-2] == key.shape[-2]:
        frames = torch.arange(query.shape[-2], device=query.device)
        chunks = spec.chunk_of(frames)
        allowed = chunks[None, :] <= chunks[:, None]
        attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min
        )[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def enable_chunk_causal(model: nn.Module, spec: ChunkSpec) -> None:
    """Give ``model``'s Whisper encoder the block-causal mask of ``spec`` (in place; the decoder is unchanged)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _chunk_causal_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the decoder's own masks, built as for SDPA
    for layer in model.get_encoder().layers:
        layer.self_attn.streamify_chunks = spec
    model.set_attn_implementation(IMPLEMENTATION)


def encode_heard(model: nn.Module, features: torch.Tensor, frames: int) -> torch.Tensor:
    """The encoder's output for its first ``frames`` frames from their own mel alone (``[batch, frames, d_model]``).

    Runs the stock modules (adapters included; differentiable) on
    ``features[..., :2·frames]``, the input's end zero-padded by the
    convolutions as at the end of a stream. Under the chunk-causal mask these
    are the frames :class:`StreamingEncoder` gives once the audio has ended;
    training runs only the frames the audio fills instead of Whisper's 1,500.
    """
    encoder = model.get_encoder()
    hidden = F.gelu(encoder.conv2(F.gelu(encoder.conv1(features[..., : 2 * frames]))))
    hidden = hidden.transpose(1, 2) + encoder.embed_positions.weight[:frames]
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


def _conv_window(conv: nn.Conv1d, x: torch.Tensor, offset: int, total: int, start: int, stop: int) -> torch.Tensor:
    """Outputs ``[start, stop)`` of ``conv`` (kernel 3, padding 1) over a sequence of ``total`` steps, of which
    ``x`` holds the steps from ``offset`` on; steps outside ``[0, total)`` are the convolution's zero padding."""
    stride = conv.stride[0]
    first, last = stride * start - 1, stride * (stop - 1) + 2  # the input steps read, [first, last)
    window = x[..., max(first, offset) - offset : min(last, total) - offset]
    window = F.pad(window, (max(0, -first), max(0, last - total)))
    return F.conv1d(window, conv.weight, conv.bias, stride=stride)


class StreamingEncoder:
    """Whisper's encoder, chunk by chunk: each call encodes the frames of the chunks whose mel is complete.

    ``mel`` grows as audio arrives (``[batch, mels, frames]``, 10 ms frames);
    ``total_mel`` is the length of the whole input when known (the end of the
    stream), else the look-ahead frame must arrive before a chunk is encoded.
    """

    def __init__(self, model: nn.Module, spec: ChunkSpec):
        self.encoder = model.get_encoder()
        self.spec = spec
        self.keys: list[torch.Tensor | None] = [None] * len(self.encoder.layers)
        self.values: list[torch.Tensor | None] = [None] * len(self.encoder.layers)
        self.done = 0  # encoder frames encoded so far

    def ready(self, mel_frames: int, final: bool) -> int:
        """How many encoder frames can be encoded from ``mel_frames`` mel frames (whole chunks unless ``final``)."""
        limit = self.encoder.config.max_source_positions
        if final:
            return min(limit, (mel_frames + 1) // 2)
        heard = min(limit, (mel_frames - 1) // 2)  # frames [0, stop) read mel frames up to 2·stop
        edges = [stop for _, stop in self.spec.bounds(limit) if stop <= heard]
        return edges[-1] if edges else 0

    @torch.inference_mode()
    def feed(self, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Encode the frames newly made complete by ``mel``; returns them (``[batch, new, d_model]``), pre-norm
        states cached, final-norm output returned."""
        stop = self.ready(mel.shape[-1], final)
        start = self.done
        if stop <= start:
            return mel.new_zeros(mel.shape[0], 0, self.encoder.config.d_model)
        encoder = self.encoder
        total_mel = mel.shape[-1] if final else 2 * encoder.config.max_source_positions
        first_c1 = max(0, 2 * start - 1)  # conv2's frames [start, stop) read conv1's [2·start - 1, 2·stop)
        c1 = F.gelu(_conv_window(encoder.conv1, mel, 0, total_mel, first_c1, min(total_mel, 2 * stop)))
        c2 = F.gelu(_conv_window(encoder.conv2, c1, first_c1, total_mel, start, stop))
        hidden = c2.transpose(1, 2) + encoder.embed_positions.weight[start:stop]
        for index, layer in enumerate(encoder.layers):
            hidden = self._layer(index, layer, hidden, start)
        self.done = stop
        return encoder.layer_norm(hidden)

    def _layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
        attn = layer.self_attn
        batch, new, _ = hidden.shape
        normed = layer.self_attn_layer_norm(hidden)
        shape = (batch, new, attn.num_heads, attn.head_dim)
        query = (attn.q_proj(normed) * attn.scaling).view(shape).transpose(1, 2)
        key = attn.k_proj(normed).view(shape).transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        if self.keys[index] is not None:
            key = torch.cat([self.keys[index], key], dim=2)
            value = torch.cat([self.values[index], value], dim=2)
        self.keys[index], self.values[index] = key, value
        chunks = self.spec.chunk_of(torch.arange(key.shape[2], device=hidden.device))
        allowed = chunks[None, :] <= chunks[start : start + new, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=1.0)
        hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, new, -1))
        mlp = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
        return hidden + mlp

    def cache_bytes(self) -> int:
        """Bytes of the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)
