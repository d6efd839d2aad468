"""Chunk-causal self-attention for encoders: a position attends to its own chunk and the chunks before it.

An encoder made chunk-causal computes the output of a chunk once the chunk
has arrived, and it never changes after, so it can run on a stream. The mask
is a transformers attention function (``streamify_chunk_causal``), applied by
the encoder self-attention modules that carry a :class:`ChunkSpec` (set by
:func:`set_chunks`); every other attention (a decoder's, cross-attention) runs
as SDPA. Which modules those are comes from the model's arch adapter
(:class:`~streamify.arch.EncoderAttention`): Whisper's encoder (20 ms frames)
and BERT-style text encoders (tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from streamify.arch import require

IMPLEMENTATION = "streamify_chunk_causal"
CONFIG_KEY = "streamify_chunk_causal"


@dataclass(frozen=True)
class ChunkSpec:
    """Chunks of ``chunk_frames`` positions (Whisper: 20 ms frames; text: tokens); the first has ``first_extra``
    more; a position sees its chunk and the ``left_chunks`` before it (0: every chunk before it)."""

    chunk_frames: int
    first_extra: int = 0
    left_chunks: int = 0

    def chunk_of(self, frames: torch.Tensor) -> torch.Tensor:
        """The chunk index of each position."""
        shifted = (frames - self.first_extra).clamp(min=0)
        return torch.div(shifted, self.chunk_frames, rounding_mode="floor")

    def bounds(self, total: int) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of the chunks covering ``total`` positions (the last may be partial)."""
        edges, start = [], 0
        stop = min(total, self.first_extra + self.chunk_frames)
        while start < total:
            edges.append((start, stop))
            start, stop = stop, min(total, stop + self.chunk_frames)
        return edges

    def allowed(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[len(queries), len(keys)]``: True where the query position may attend to the key position."""
        query_chunks, key_chunks = self.chunk_of(queries)[:, None], self.chunk_of(keys)[None, :]
        allowed = key_chunks <= query_chunks
        return allowed & (key_chunks >= query_chunks - self.left_chunks) if self.left_chunks else allowed

    @classmethod
    def from_json(cls, stored: dict) -> ChunkSpec:
        """The spec of a config's ``streamify_chunk_causal`` entry."""
        return cls(int(stored["chunk_frames"]), int(stored.get("first_extra", 0)), int(stored.get("left_chunks", 0)))

    def to_json(self) -> dict:
        """The spec as stored in the manifest and config."""
        return asdict(self)


def _chunk_causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``streamify_chunk_causal`` attention function: block-causal for modules that carry a spec, combined
    with the model's own mask (padding); plain SDPA for the others."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spec = getattr(module, "streamify_chunks", None)
    if spec is not None and query.shape[-2] == key.shape[-2]:
        positions = torch.arange(query.shape[-2], device=query.device)
        allowed = spec.allowed(positions, positions)[None, None]
        if attention_mask is None:
            pass
        elif attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask
        else:
            allowed = allowed & (attention_mask > torch.finfo(attention_mask.dtype).min / 2)
        attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def encoder_layers(model: nn.Module, where: str = "the model") -> nn.ModuleList:
    """The encoder's block list, found through the arch adapter (:class:`~streamify.errors.InputError` if none)."""
    found = require(model.config.model_type, "encoder_attention", "a chunk-causal encoder", where).encoder_attention
    return model.base_model.get_submodule(found.layers)


def attention_modules(model: nn.Module, where: str = "the model") -> list[nn.Module]:
    """The encoder self-attention modules that take the chunk-causal mask."""
    found = require(model.config.model_type, "encoder_attention", "a chunk-causal encoder", where).encoder_attention
    return [layer.get_submodule(found.attention) for layer in encoder_layers(model, where)]


def set_chunks(model: nn.Module, spec: ChunkSpec | None) -> None:
    """Mask the encoder's self-attention chunk-causally by ``spec``, or not at all (``None``: bidirectional)."""
    for module in attention_modules(model):
        module.streamify_chunks = spec


def enable_chunk_causal(model: nn.Module, spec: ChunkSpec) -> None:
    """Give ``model``'s encoder the block-causal mask of ``spec`` (in place; other attention is unchanged)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _chunk_causal_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the model's own masks, built as for SDPA
    set_chunks(model, spec)
    model.set_attn_implementation(IMPLEMENTATION)
