"""A KV cache whose size is fixed by the streaming spec, not by the stream's length.

``sink_window`` layers keep the first ``sinks`` tokens and the last
``window - 1`` tokens between steps (a chunk of new tokens is appended for
its own step, then trimmed); ``full`` layers keep everything; ``ssm`` layers (a
hybrid's Mamba mixers) keep transformers' own fixed-size convolution and
recurrent states. Keys are stored un-rotated: :mod:`streamify.runtime.attention`
rotates them by their slot.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin, LinearAttentionLayer

from streamify.errors import UsageError
from streamify.runtime.kv_quant import QuantizedKV
from streamify.runtime.spec import FULL, SSM, StreamingSpec


class StreamingCacheLayer(CacheLayerMixin):
    """One layer's sink keys/values, recent keys/values, and the count of tokens seen.

    With ``kv_bits`` 4 the recent tokens are kept as INT4 groups once their own
    step has run (:mod:`streamify.runtime.kv_quant`); sinks stay in full precision.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, kind: str, sinks: int, window: int, kv_bits: int | None = None):
        super().__init__()
        self.kind = kind
        self.sinks = 0 if kind == FULL else sinks
        self.window = window
        self.kv_bits = kv_bits
        self.sink: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None  # recent tokens in full precision
        self.stored: QuantizedKV | None = None  # older recent tokens in INT4 (kv_bits 4)
        self.recent_start = 0
        self.seen = 0
        self.pending = False  # a chunk was appended and its attention has not run yet

    @property
    def recent(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The recent keys and values (INT4 ones dequantized), oldest first."""
        old = self.stored.dequantize() if self.stored is not None else None
        if old is None or self.fresh is None:
            return old if self.fresh is None else self.fresh
        return torch.cat((old[0], self.fresh[0]), dim=-2), torch.cat((old[1], self.fresh[1]), dim=-2)

    def recent_length(self) -> int:
        """Recent tokens held."""
        fresh = 0 if self.fresh is None else self.fresh[0].shape[-2]
        return fresh + (0 if self.stored is None else self.stored.length)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append a chunk of un-rotated keys and values; returns them unchanged."""
        self.is_initialized = True
        taken = 0
        if self.seen < self.sinks:
            taken = min(self.sinks - self.seen, key_states.shape[-2])
            self.sink = _append(self.sink, key_states[:, :, :taken], value_states[:, :, :taken])
        if self.recent_length() == 0:
            self.recent_start = self.seen + taken
        self.fresh = _append(self.fresh, key_states[:, :, taken:], value_states[:, :, taken:])
        self.seen += key_states.shape[-2]
        self.pending = True
        return key_states, value_states

    def trim(self) -> None:
        """After the chunk's attention ran: drop recent tokens no later query attends to, quantize the rest."""
        self.pending = False
        extra = self.recent_length() - (self.window - 1) if self.kind != FULL else 0
        if extra > 0:
            from_stored = min(extra, 0 if self.stored is None else self.stored.length)
            if from_stored:
                self.stored.drop_front(from_stored)
            rest = extra - from_stored
            if rest:
                self.fresh = (self.fresh[0][:, :, rest:].clone(), self.fresh[1][:, :, rest:].clone())
            self.recent_start += extra
        if self.kv_bits == 4 and self.fresh is not None and self.fresh[0].shape[-2]:
            if self.stored is None:
                self.stored = QuantizedKV(self.fresh[0].shape[-1], self.fresh[0].dtype)
            self.stored.append(*self.fresh)
            self.fresh = None

    def nbytes(self) -> int:
        """Bytes of the keys and values held now."""
        tensors = [t for pair in (self.sink, self.fresh) if pair is not None for t in pair]
        stored = 0 if self.stored is None else self.stored.nbytes()
        return stored + sum(t.numel() * t.element_size() for t in tensors)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.recent_length() + (0 if self.sink is None else self.sink[0].shape[-2]) + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.kind == FULL else self.sinks + self.window - 1

    def reset(self) -> None:
        self.sink, self.fresh, self.stored, self.recent_start, self.seen = None, None, None, 0, 0


def _append(pair, keys: torch.Tensor, values: torch.Tensor):
    if pair is None:
        return keys, values
    return torch.cat((pair[0], keys), dim=-2), torch.cat((pair[1], values), dim=-2)


class StreamingCache(Cache):
    """The cache of a streaming model: one :class:`StreamingCacheLayer` per decoder layer.

    Whichever cache the model is called with becomes the one its attention
    reads, so several streams can share one model (one call at a time).
    """

    def __init__(self, spec: StreamingSpec, controller, kv_bits: int | None = None):
        layers = [
            LinearAttentionLayer() if kind == SSM else StreamingCacheLayer(kind, spec.sinks, spec.window, kv_bits)
            for kind in spec.layer_types
        ]
        super().__init__(layers=layers)
        self.spec = spec
        self.controller = controller

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append a chunk to layer ``layer_idx`` and make this the cache the model's attention reads."""
        self.controller.cache = self
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> int:
        """Bytes of every layer's keys and values (and Mamba states) held now."""
        return cache_bytes(self)


def cache_bytes(cache: Cache) -> int:
    """Bytes a cache holds now: keys and values, and the convolution and recurrent states of Mamba layers."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, StreamingCacheLayer):
            total += layer.nbytes()
            continue
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            tensors += [*layer.conv_states.values(), *layer.recurrent_states.values()]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def new_cache(model, kv_bits: int | None = None) -> StreamingCache:
    """A fresh cache for a streaming model (pass it as ``past_key_values``); ``kv_bits`` 4 quantizes it."""
    ctl = getattr(model, "streamify_controller", None)
    if ctl is None:
        raise ValueError("the model is not streaming; load a streaming artifact or call enable_streaming first")
    if kv_bits not in (None, 4):
        raise UsageError(
            f"--kv-bits {kv_bits}: the cache holds keys and values as computed, or in 4 bits", "use --kv-bits 4"
        )
    return StreamingCache(ctl.spec, ctl, kv_bits)
