"""A chunk-causal Whisper encoder: block-causal self-attention over 20 ms frames, run chunk by chunk with a cache.

Whisper's encoder sees its whole 30-second input at once. Made chunk-causal
(CarelessWhisper), a frame attends to the frames of its own chunk and of the
chunks before it, so the encoder output of a chunk never changes once the
chunk has been heard and can be computed as audio arrives:

- :func:`~streamify.runtime.chunk_causal.enable_chunk_causal` gives the stock
  transformers encoder that mask (the decoder keeps its own): one forward
  under the mask is the reference, and :func:`encode_heard` the form
  training uses.
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

import torch
import torch.nn.functional as F
from torch import nn

from streamify.errors import UsageError
from streamify.runtime.chunk_causal import ChunkSpec

FRAME_MS = 20  # one encoder frame: two 10 ms mel frames


def whisper_chunks(chunk_ms: int, first_extra_ms: int = 0, left_chunks: int = 0) -> ChunkSpec:
    """A spec from milliseconds, which must be whole encoder frames (multiples of 20 ms)."""
    for name, value in (("--chunk-ms", chunk_ms), ("--first-chunk-extra-ms", first_extra_ms)):
        if value % FRAME_MS or value < (FRAME_MS if name == "--chunk-ms" else 0):
            raise UsageError(
                f"{name} {value}: Whisper's encoder frames are {FRAME_MS} ms, so a chunk is a whole number of them",
                f"use a multiple of {FRAME_MS} ms, e.g. 300",
            )
    return ChunkSpec(chunk_ms // FRAME_MS, first_extra_ms // FRAME_MS, left_chunks)


def chunk_json(spec: ChunkSpec) -> dict:
    """A Whisper spec as stored in the manifest and config: frames and milliseconds."""
    return {**spec.to_json(), "chunk_ms": spec.chunk_frames * FRAME_MS, "first_extra_ms": spec.first_extra * FRAME_MS}


def encode_heard(model: nn.Module, features: torch.Tensor, frames: int) -> torch.Tensor:
    """The encoder's output for its first ``frames`` frames from their own mel alone (``[batch, frames, d_model]``).

    Runs the stock modules (adapters included; differentiable) on
    ``features[..., :2·frames]``, the input's end zero-padded by the
    convolutions as at the end of a stream. Under the chunk-causal mask, given
    the mel of the audio alone and ``frames`` = (mel frames + 1) // 2, these
    are the frames :class:`StreamingEncoder` gives once the audio has ended;
    training runs only those instead of Whisper's 1,500.
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
        self.kept_from = 0  # the frame of the oldest cached key (later than 0 with a limited left context)

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
        if self.spec.left_chunks:
            self._forget(stop)
        return encoder.layer_norm(hidden)

    def _forget(self, stop: int) -> None:
        """Drop the cached frames that no frame from ``stop`` on may attend to (left context exhausted)."""
        cached = torch.arange(self.kept_from, stop)
        oldest_seen = self.spec.chunk_of(torch.tensor(stop)) - self.spec.left_chunks
        drop = int((self.spec.chunk_of(cached) < oldest_seen).sum())
        if drop:  # copies, so the dropped frames' memory is freed
            self.keys = [key[:, :, drop:].clone() for key in self.keys]
            self.values = [value[:, :, drop:].clone() for value in self.values]
            self.kept_from += drop

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
        positions = torch.arange(self.kept_from, start + new, device=hidden.device)
        allowed = self.spec.allowed(positions[start - self.kept_from :], positions)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=1.0)
        hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, new, -1))
        mlp = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
        return hidden + mlp

    def cache_bytes(self) -> int:
        """Bytes of the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)
