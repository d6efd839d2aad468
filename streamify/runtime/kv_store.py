"""Where a streaming cache layer keeps the keys and values past its sinks.

A ``sink_window`` layer keeps its last ``window - 1`` tokens in a ring of
that many slots, allocated once: a token at position ``p`` goes to slot
``(p - origin) mod capacity`` and overwrites the one that has just left the
window, so a decode step writes one slot in place instead of concatenating and
trimming the window (as transformers' static sliding-window layer does). The
slots are read in place, out of order, with each slot's position computed from
host integers (no value is read back from the device). A ``full`` layer keeps
every token and grows.

Tokens are held as computed, or through a codec (INT4 groups,
:class:`~streamify.runtime.kv_quant.Int4Codec`) whose parts all keep the
tokens on dim -2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class Codec(Protocol):
    """How tokens are held: ``encode`` to parts with tokens on dim -2, ``decode`` back."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


class AsComputed:
    """Keys and values held as they are."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,)

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return parts[0]


@dataclass
class KeyBlock:
    """Keys and their values, the absolute position of each key, and the lowest one (a host int); ``frame``:
    the keys are rotated already, by their position minus ``frame`` (None: un-rotated)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    first: int
    frame: int | None = None


class TokenStore:
    """Tokens at consecutive positions from ``origin``: all of them (``capacity`` None), or the last
    ``capacity`` in a ring."""

    def __init__(self, codec: Codec, origin: int, capacity: int | None) -> None:
        self.codec = codec
        self.origin = origin
        self.capacity = capacity
        self.count = 0  # tokens written so far
        self.parts: list[tuple[torch.Tensor, ...]] | None = None  # keys' parts, values' parts

    @property
    def length(self) -> int:
        """Tokens held."""
        return self.count if self.capacity is None else min(self.count, self.capacity)

    @property
    def first(self) -> int:
        """The position of the oldest token held (of the next one written, when none is)."""
        return self.origin + self.count - self.length

    def map_keys(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the held keys by ``change(keys)``, in place (keys held as computed)."""
        if self.parts is not None:
            keys = self.parts[0][0]
            keys.copy_(change(keys))

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep ``keys`` and ``values`` (``[batch, heads, tokens, head_dim]``) as the next positions."""
        tokens = keys.shape[-2]
        if self.capacity is None:
            new = [self.codec.encode(keys), self.codec.encode(values)]
            held = self.parts
            self.parts = new if held is None else [_cat(old, add) for old, add in zip(held, new, strict=True)]
        elif self.capacity > 0 and tokens:
            kept = min(tokens, self.capacity)  # the chunk's last tokens; earlier ones have left the window
            new = [self.codec.encode(keys[:, :, -kept:]), self.codec.encode(values[:, :, -kept:])]
            if self.parts is None:
                self.parts = [tuple(_slots(part, self.capacity) for part in parts) for parts in new]
            start = self.origin + self.count + tokens - kept
            slots = (torch.arange(start, start + kept, device=keys.device) - self.origin) % self.capacity
            for held, add in zip(self.parts, new, strict=True):
                for target, source in zip(held, add, strict=True):
                    target.index_copy_(-2, slots, source)
        self.count += tokens

    def read(self, frame: int | None = None) -> KeyBlock | None:
        """The tokens held, decoded, with their positions (None when empty); a full ring is read in slot order.
        ``frame``: the keys were written rotated in it."""
        if self.parts is None or self.length == 0:
            return None
        held = self.length
        keys, values = (self.codec.decode(tuple(t[:, :, :held] for t in parts)) for parts in self.parts)
        following = self.origin + self.count  # the next position to be written
        slot = torch.arange(held, device=keys.device)
        if self.capacity is None:
            positions = self.origin + slot
        else:  # the latest position below `following` that maps to each slot
            positions = following - 1 - (following - 1 - self.origin - slot) % self.capacity
        return KeyBlock(keys, values, positions, self.first, frame)

    def nbytes(self) -> int:
        """Bytes allocated (a ring's whole capacity once it holds anything)."""
        if self.parts is None:
            return 0
        return sum(t.numel() * t.element_size() for parts in self.parts for t in parts)


def _cat(old: tuple[torch.Tensor, ...], add: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat((a, b), dim=-2) for a, b in zip(old, add, strict=True))


def _slots(like: torch.Tensor, capacity: int) -> torch.Tensor:
    """An empty ring of ``capacity`` slots for tensors shaped like ``like``."""
    return like.new_zeros(*like.shape[:-2], capacity, like.shape[-1])
