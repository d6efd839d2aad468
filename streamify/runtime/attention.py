"""Sink + window attention inside transformers' own decoder code.

A streaming model is the stock transformers model with two substitutions:
its rotary embedding returns the identity (so queries and keys reach the
cache and the attention function un-rotated), and its attention
implementation is :func:`streaming_attention`, which rotates them itself with
re-indexed positions:

- keys in the window and the query are rotated in one frame (by their
  position minus the frame's start), so window distances are the true ones;
  a cache holds these keys rotated already (:func:`_into_frame`: rotated once,
  when they arrive, in a frame that moves with the stream), a whole sequence
  rotates them in the frame of its earliest key;
- the sink keys are rotated by their slot (0..sinks-1) and the query at
  ``min(p, sinks + window - 1)``, its slot when the cache is full, so a sink
  never looks further away than the cache is long.

Both blocks share one softmax. When the model is called with the
:class:`~streamify.runtime.cache.StreamingCache` bound to it, the chunk's keys
come from the cache (chunked, bounded memory); called without a cache, the
whole sequence is one chunk under the explicit sink + window mask (training,
the equivalence reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamify.arch import require
from streamify.errors import InputError
from streamify.model.blocks import find_blocks
from streamify.runtime.kv_store import KeyBlock
from streamify.runtime.spec import FULL, SSM, StreamingSpec

IMPLEMENTATION = "streamify_streaming"
QUERY_BLOCK = 512  # queries per block when a whole sequence is attended at once
SMALL_CHUNK = 64  # up to this many queries (decode, streaming chunks) the scores are computed as they are


class StreamingController:
    """Holds a streaming model's spec, its original rotary embedding and the cache bound to it."""

    def __init__(self, spec: StreamingSpec, rotary: nn.Module, attn_implementation: str):
        self.spec = spec
        self.rotary = rotary
        self.attn_implementation = attn_implementation
        self.cache = None
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(
        self, positions: torch.Tensor | slice, like: torch.Tensor, needed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions`` (1-D, or a slice, all below ``needed``, a bound the caller knows on the
        host, so no device value is read back), as the model's own rotary embedding computes them."""
        key = (like.device, like.dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < needed:
            size = max(needed, 2 * table[0].shape[0] if table is not None else 256)
            ids = torch.arange(size, device=like.device)[None]
            cos, sin = self.rotary(like[:1, :1, :1, :1].reshape(1, 1, 1), ids)
            table = (cos[0], sin[0])
            self._tables[key] = table
        return table[0][positions], table[1][positions]


class _IdentityRotary(nn.Module):
    """Returns cos = 1, sin = 0 of the wrapped rotary's shape: rotation by zero."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        cos, sin = self.inner(x, position_ids, *args, **kwargs)
        return torch.ones_like(cos), torch.zeros_like(sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else torch.repeat_interleave(x, groups, dim=1)


def attend(
    ctl: StreamingController,
    kind: str,
    query: torch.Tensor,
    sink: tuple[torch.Tensor, torch.Tensor] | None,
    blocks: list[KeyBlock],
    q_start: int,
    scaling: float,
) -> torch.Tensor:
    """Attention of a chunk of queries (absolute positions from ``q_start``) over sink keys and ``blocks`` of
    later keys (each with its keys' positions, in any order); keys are un-rotated.

    ``sink`` holds the first tokens of the stream (slots 0..). Returns
    ``[batch, chunk, heads, head_dim]`` as transformers' attention functions do.
    """
    spec = ctl.spec
    device = query.device
    chunk = query.shape[-2]
    q_abs = torch.arange(q_start, q_start + chunk, device=device)
    small = chunk <= SMALL_CHUNK and not (torch.is_grad_enabled() and query.requires_grad)
    if len(blocks) > 1 and not small:  # one block for the fused call (a widened head dim per part)
        blocks = [_joined(blocks)]
    parts = []
    if sink is not None and sink[0].shape[-2] > 0:
        sink_k, sink_v = sink
        slots = torch.arange(sink_k.shape[-2], device=device)
        cos_s, sin_s = ctl.cos_sin(slots, query, sink_k.shape[-2])
        cos_qs, sin_qs = ctl.cos_sin(q_abs.clamp(max=spec.capacity), query, min(q_start + chunk, spec.capacity + 1))
        sink_allowed = slots[None] <= q_abs[:, None]
        parts.append((_rotate(query, cos_qs, sin_qs), _rotate(sink_k, cos_s, sin_s), sink_v, sink_allowed))
    if blocks:  # queries and keys rotated in one frame, so window distances are the true ones
        frame = blocks[0].frame  # keys held rotated (every block in the same frame), else from the earliest key
        origin = min(block.first for block in blocks) if frame is None else frame
        needed = q_start + chunk - origin  # every key lies before the chunk's end
        # queries before the window (the sinks' own) see none of it: position 0 stands in, masked below
        cos_q, sin_q = ctl.cos_sin((q_abs - origin).clamp(min=0), query, needed)
        rotated_query = _rotate(query, cos_q, sin_q)
        for block in blocks:
            keys = block.keys
            if block.frame is None:
                keys = _rotate(keys, *ctl.cos_sin(block.positions - origin, query, needed))
            allowed = block.positions[None] <= q_abs[:, None]
            if kind != FULL:
                allowed &= block.positions[None] > q_abs[:, None] - spec.window
            parts.append((rotated_query, keys, block.values, allowed))
    return (_explicit(parts, scaling) if small else _fused(parts, scaling)).transpose(1, 2).contiguous()


def _joined(blocks: list[KeyBlock]) -> KeyBlock:
    return KeyBlock(
        torch.cat([b.keys for b in blocks], dim=-2),
        torch.cat([b.values for b in blocks], dim=-2),
        torch.cat([b.positions for b in blocks]),
        min(b.first for b in blocks),
        blocks[0].frame,
    )


def _into_frame(ctl: StreamingController, layer) -> None:
    """Rotate the pending chunk's keys into the layer's frame (they are held so, and never rotated again).

    A ``sink_window`` layer moves its frame up to its oldest key once the
    stream's end is more than twice the window past it (one rotation of the
    held keys back by the move), so rotary angles stay below a few windows
    however long the stream runs; a ``full`` layer keeps frame 0, as the stock
    model's cache does.
    """
    chunk = layer.chunk
    if not chunk.keys.shape[-2]:  # all of the chunk went to the sinks
        return
    if layer.kind != FULL and layer.seen - layer.frame > 2 * ctl.spec.window:
        held = layer.held if layer.held is not None and layer.held.length else None
        oldest = chunk.first if held is None else held.first
        if held is not None:
            shift = oldest - layer.frame
            cos, sin = ctl.cos_sin(slice(shift, shift + 1), chunk.keys, shift + 1)  # (a slice: no host copy)
            held.map_keys(lambda keys: _rotate(keys, cos, -sin))  # back by the shift
        layer.frame = oldest
    cos, sin = ctl.cos_sin(chunk.positions - layer.frame, chunk.keys, layer.seen - layer.frame)
    layer.chunk = KeyBlock(_rotate(chunk.keys, cos, sin), chunk.values, chunk.positions, chunk.first, layer.frame)


Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # rotated query, rotated keys, values, allowed


def _fused(parts: list[Part], scaling: float) -> torch.Tensor:
    """One softmax over the parts' scores in one ``scaled_dot_product_attention`` call (flash kernels: the
    scores are never held, so training memory grows with the keys, not with queries × keys).

    Each part's query and keys get their own slice of a widened head dim
    (zeros elsewhere), so a key of part ``i`` scores ``q_i · k_i`` only; the
    values are zero-padded to the same width, as the fused kernels want.
    """
    head_dim = parts[0][0].shape[-1]
    width = head_dim * len(parts)
    query = torch.cat([q for q, *_ in parts], dim=-1)
    keys = torch.cat(
        [F.pad(k, (i * head_dim, width - (i + 1) * head_dim)) for i, (_, k, _, _) in enumerate(parts)], dim=-2
    )
    values = torch.cat([v for _, _, v, _ in parts], dim=-2)
    values = F.pad(values, (0, width - head_dim))
    allowed = torch.cat([allowed for *_, allowed in parts], dim=-1)
    groups = query.shape[1] // keys.shape[1]
    if groups > 1 and query.device.type != "cpu":  # CUDA's fused kernels take a mask only without enable_gqa
        keys, values, groups = _repeat_heads(keys, groups), _repeat_heads(values, groups), 1
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scaling, enable_gqa=groups > 1)
    return out[..., :head_dim]


def _explicit(parts: list[Part], scaling: float) -> torch.Tensor:
    """The same softmax for a few queries without gradients (decode): each part's scores ``q_i · k_i`` side by
    side, one softmax in fp32, one product with the values; grouped query heads share their key heads
    (no repeat). The scores are chunk × keys: small here, and no widened head dim is built each step."""
    query = parts[0][0]
    batch, heads, chunk, head_dim = query.shape
    kv_heads = parts[0][1].shape[1]
    groups = heads // kv_heads

    def grouped(q: torch.Tensor) -> torch.Tensor:  # [b, h, c, d] -> [b, kv, groups * c, d]
        return q.reshape(batch, kv_heads, groups * chunk, head_dim)

    scores = torch.cat([grouped(q) @ k.transpose(-1, -2) for q, k, _, _ in parts], dim=-1).float() * scaling
    allowed = torch.cat([allowed for *_, allowed in parts], dim=-1).repeat(groups, 1)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(query.dtype)
    per_part = weights.split([k.shape[-2] for _, k, _, _ in parts], dim=-1)
    out = sum(w @ v for w, (_, _, v, _) in zip(per_part, parts, strict=True))
    return out.reshape(batch, heads, chunk, head_dim)


def _whole_sequence(ctl, kind, query, key, value, scaling) -> torch.Tensor:
    """The whole sequence under the layer's mask (training, the equivalence reference), by blocks of
    :data:`QUERY_BLOCK` queries over the keys they can see: compute and memory grow with
    length × (sinks + window + block), not length²."""
    spec = ctl.spec
    sinks = 0 if kind == FULL else spec.sinks
    sink = (key[:, :, :sinks], value[:, :, :sinks]) if sinks else None
    length = query.shape[-2]
    outs = []
    for start in range(0, length, QUERY_BLOCK):
        stop = min(length, start + QUERY_BLOCK)
        first = sinks if kind == FULL else max(sinks, start - spec.window + 1)
        positions = torch.arange(first, stop, device=key.device)
        recent = KeyBlock(key[:, :, first:stop], value[:, :, first:stop], positions, first)
        outs.append(attend(ctl, kind, query[:, :, start:stop], sink, [recent], start, scaling))
    return torch.cat(outs, dim=1)


def streaming_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ``streamify_streaming`` (transformers' interface)."""
    ctl, kind = module.streamify_layer
    scaling = module.scaling if scaling is None else scaling
    if kwargs.get("softcap"):
        raise InputError(
            "streaming attention does not soft-cap attention logits, which this model's attention does",
            "convert a model without attention logit soft-capping",
        )
    layer = ctl.cache.layers[module.layer_idx] if ctl.cache is not None else None
    if layer is not None and layer.pending:
        if layer.frame is not None:
            _into_frame(ctl, layer)
        out = attend(ctl, kind, query, layer.sink, layer.window_blocks(), layer.seen - query.shape[-2], scaling)
        layer.commit()
        return out, None
    if key.shape[-2] != query.shape[-2]:
        raise InputError(
            "a streaming model was called with a cache that is not streamify's",
            "use streamify.runtime.new_cache(model), or call it without past_key_values",
        )
    return _whole_sequence(ctl, kind, query, key, value, scaling), None


def _register() -> None:
    """Make ``streamify_streaming`` an attention implementation transformers knows (imports transformers' models:
    done when a model is made to stream, so that light commands such as ``recipe validate`` stay fast)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, streaming_attention)


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix, model)


def check_streamable(model: nn.Module, where: str) -> None:
    """Raise :class:`InputError` (exit 3) unless streamify can make ``model`` stream."""
    model_type = getattr(model.config, "model_type", "?")
    require(model_type, "streaming", "streaming conversion", where)
    if getattr(_base_model(model), "rotary_emb", None) is None:
        raise InputError(
            f"{where}: streaming conversion needs the model's rotary embedding (model.rotary_emb), "
            f"which this '{model_type}' model does not have (a GraniteMoeHybrid without "
            "position_embedding_type rope has no positions in its attention)",
            "convert a model with rotary positions",
        )


def ssm_layers(model: nn.Module) -> tuple[int, ...]:
    """The blocks with no attention (a hybrid's Mamba layers): the spec's ``ssm`` layers."""
    _, blocks = find_blocks(model)
    return tuple(i for i, block in enumerate(blocks) if getattr(block, "self_attn", None) is None)


def enable_streaming(model: nn.Module, spec: StreamingSpec) -> StreamingController:
    """Make ``model`` attend with sinks + window per ``spec`` (in place); returns its controller."""
    ssm = tuple(i for i, kind in enumerate(spec.layer_types) if kind == SSM)
    if ssm != ssm_layers(model):
        raise InputError(
            f"the streaming spec's Mamba (ssm) layers {list(ssm)} are not the model's layers without attention "
            f"{list(ssm_layers(model))}",
            "re-create the artifact with streamify (distill hybrid --window, or convert streaming)",
        )
    if getattr(model, "streamify_controller", None) is not None:
        disable_streaming(model)
    _register()
    base = _base_model(model)
    rotary = base.rotary_emb
    ctl = StreamingController(spec, rotary, model.config._attn_implementation)
    base.rotary_emb = _IdentityRotary(rotary)
    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        if spec.layer_types[index] != SSM:  # a hybrid's Mamba layer keeps its own state
            block.self_attn.streamify_layer = (ctl, spec.layer_types[index])
    model.set_attn_implementation(IMPLEMENTATION)
    model.streamify_controller = ctl
    return ctl


def disable_streaming(model: nn.Module) -> None:
    """Undo :func:`enable_streaming`: the stock rotary embedding and attention come back."""
    ctl = getattr(model, "streamify_controller", None)
    if ctl is None:
        return
    _base_model(model).rotary_emb = ctl.rotary
    _, blocks = find_blocks(model)
    for block in blocks:  # (the blocks may be fewer than the spec's layers: pruning re-enables after slicing)
        attention = getattr(block, "self_attn", None)  # a hybrid's Mamba layers have none
        if attention is not None and hasattr(attention, "streamify_layer"):
            del attention.streamify_layer
    model.set_attn_implementation(ctl.attn_implementation)
    model.streamify_controller = None
