"""A KV cache whose size is fixed by the streaming spec, not by the stream's length.

``sink_window`` layers keep the first ``sinks`` tokens and the last
``window - 1`` tokens between steps (a chunk of new tokens is appended for
its own step, then trimmed); ``full`` layers keep everything. Keys are stored
un-rotated: :mod:`streamify.runtime.attention` rotates them by their slot.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from streamify.runtime.spec import FULL, StreamingSpec


class StreamingCacheLayer(CacheLayerMixin):
    """One layer's sink keys/values, recent keys/values, and the count of tokens seen."""

    is_sliding = False
    is_compileable = False

    def __init__(self, kind: str, sinks: int, window: int):
        super().__init__()
        self.kind = kind
        self.sinks = 0 if kind == FULL else sinks
        self.window = window
        self.sink: tuple[torch.Tensor, torch.Tensor] | None = None
        self.recent: tuple[torch.Tensor, torch.Tensor] | None = None
        self.recent_start = 0
        self.seen = 0
        self.pending = False  # a chunk was appended and its attention has not run yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append a chunk of un-rotated keys and values; returns them unchanged."""
        self.is_initialized = True
        taken = 0
        if self.seen < self.sinks:
            taken = min(self.sinks - self.seen, key_states.shape[-2])
            self.sink = _append(self.sink, key_states[:, :, :taken], value_states[:, :, :taken])
        if self.recent is None or self.recent[0].shape[-2] == 0:
            self.recent_start = self.seen + taken
        self.recent = _append(self.recent, key_states[:, :, taken:], value_states[:, :, taken:])
        self.seen += key_states.shape[-2]
        self.pending = True
        return key_states, value_states

    def trim(self) -> None:
        """Drop recent tokens no later query can attend to (after the chunk's attention ran)."""
        self.pending = False
        if self.kind == FULL:
            return
        extra = self.recent[0].shape[-2] - (self.window - 1)
        if extra > 0:
            self.recent = (self.recent[0][:, :, extra:].clone(), self.recent[1][:, :, extra:].clone())
            self.recent_start += extra

    def nbytes(self) -> int:
        """Bytes of the keys and values held now."""
        tensors = [t for pair in (self.sink, self.recent) if pair is not None for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = 0 if self.recent is None else self.recent[0].shape[-2]
        return held + (0 if self.sink is None else self.sink[0].shape[-2]) + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.kind == FULL else self.sinks + self.window - 1

    def reset(self) -> None:
        self.sink, self.recent, self.recent_start, self.seen = None, None, 0, 0


def _append(pair, keys: torch.Tensor, values: torch.Tensor):
    if pair is None:
        return keys, values
    return torch.cat((pair[0], keys), dim=-2), torch.cat((pair[1], values), dim=-2)


class StreamingCache(Cache):
    """The cache of a streaming model: one :class:`StreamingCacheLayer` per decoder layer.

    Whichever cache the model is called with becomes the one its attention
    reads, so several streams can share one model (one call at a time).
    """

    def __init__(self, spec: StreamingSpec, controller):
        super().__init__(layers=[StreamingCacheLayer(kind, spec.sinks, spec.window) for kind in spec.layer_types])
        self.spec = spec
        self.controller = controller

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append a chunk to layer ``layer_idx`` and make this the cache the model's attention reads."""
        self.controller.cache = self
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> int:
        """Bytes of every layer's keys and values held now."""
        return sum(layer.nbytes() for layer in self.layers)


def new_cache(model) -> StreamingCache:
    """A fresh cache for a streaming model (pass it as ``past_key_values``)."""
    ctl = getattr(model, "streamify_controller", None)
    if ctl is None:
        raise ValueError("the model is not streaming; load a streaming artifact or call enable_streaming first")
    return StreamingCache(ctl.spec, ctl)
