"""A KV cache whose size is fixed by the streaming spec, not by the stream's length.

``sink_window`` layers keep the first ``sinks`` tokens and the last
``window - 1`` tokens between steps, in a ring (:mod:`streamify.runtime.kv_store`;
a chunk of new tokens is attended as it is, then written over the slots that
left the window); ``full`` layers keep everything; ``ssm`` layers (a
hybrid's Mamba mixers) keep transformers' own fixed-size convolution and
recurrent states. Sink keys are stored un-rotated (:mod:`streamify.runtime.attention`
rotates them by their slot); later keys are stored rotated into the layer's
``frame`` (INT4 ones un-rotated).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin, LinearAttentionLayer

from streamify.errors import UsageError
from streamify.runtime.kv_quant import Int4Codec
from streamify.runtime.kv_store import AsComputed, KeyBlock, TokenStore
from streamify.runtime.spec import FULL, SSM, StreamingSpec


class StreamingCacheLayer(CacheLayerMixin):
    """One layer's sink keys/values, its later tokens (:class:`~streamify.runtime.kv_store.TokenStore`: a ring
    of ``window - 1`` slots, or everything for a ``full`` layer), the chunk whose attention runs now, and the
    count of tokens seen.

    With ``kv_bits`` 4 the later tokens are kept as INT4 groups once their own
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
        self.held: TokenStore | None = None
        self.chunk: KeyBlock | None = None  # the call's tokens past the sinks, until its attention has run
        self.seen = 0
        # held keys are rotated by their position minus `frame` (rotated once, not every step; the attention
        # moves the frame up now and then); INT4 keys are held un-rotated: re-rotating them would round again
        self.frame: int | None = 0 if kv_bits is None else None

    @property
    def pending(self) -> bool:
        """A chunk was appended and its attention has not run yet."""
        return self.chunk is not None

    def window_blocks(self) -> list[KeyBlock]:
        """The tokens past the sinks that the pending chunk's queries may see: those held, then the chunk's own."""
        held = None if self.held is None else self.held.read(self.frame)
        return [block for block in (held, self.chunk) if block is not None and block.keys.shape[-2]]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take a chunk of un-rotated keys and values: sinks are kept now, the rest after the chunk's attention
        (:meth:`commit`); returns them unchanged."""
        self.is_initialized = True
        taken = 0
        if self.seen < self.sinks:
            taken = min(self.sinks - self.seen, key_states.shape[-2])
            self.sink = _append(self.sink, key_states[:, :, :taken], value_states[:, :, :taken])
        first = self.seen + taken
        positions = torch.arange(first, self.seen + key_states.shape[-2], device=key_states.device)
        self.chunk = KeyBlock(key_states[:, :, taken:], value_states[:, :, taken:], positions, first)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def commit(self) -> None:
        """After the chunk's attention ran: keep its tokens (a ring keeps the last ``window - 1``)."""
        chunk, self.chunk = self.chunk, None
        if self.held is None:
            codec = Int4Codec(chunk.keys.shape[-1], chunk.keys.dtype) if self.kv_bits == 4 else AsComputed()
            self.held = TokenStore(codec, self.sinks, None if self.kind == FULL else self.window - 1)
        self.held.write(chunk.keys, chunk.values)

    def nbytes(self) -> int:
        """Bytes of the keys and values held now (a ring's whole capacity once it holds anything)."""
        sink = 0 if self.sink is None else sum(t.numel() * t.element_size() for t in self.sink)
        return sink + (0 if self.held is None else self.held.nbytes())

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = 0 if self.held is None else self.held.length
        return held + (0 if self.sink is None else self.sink[0].shape[-2]) + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.kind == FULL else self.sinks + self.window - 1

    def reset(self) -> None:
        self.sink, self.held, self.chunk, self.seen = None, None, None, 0
        self.frame = 0 if self.kv_bits is None else None


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
