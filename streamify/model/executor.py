"""The block-wise executor: run a model one block at a time, with one block's weights in memory.

The model is built on the meta device (no memory). The tensors outside its
block list (embeddings, final norm, head) are brought in once (calibration
sends the embeddings and head away while it runs the blocks); a block's
tensors are brought in from a :class:`WeightSource` right before it runs and
dropped (back to the meta device) after. Lazy loading (from safetensors files
or an entropy-coded container, float or INT4) and calibration go through it; with no source
(a model already in memory) bringing and dropping cost nothing, so the same
code runs both ways.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from streamify.errors import InputError
from streamify.model.blocks import block_list


class WeightSource(Protocol):
    """Where a model's tensors come from, by name (safetensors files, a coded container)."""

    def names(self) -> list[str]:
        """Every tensor name the source holds."""
        ...

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, on the CPU. A source that also has ``layout(names)`` (shape and dtype of the
        tensors it can write into buffers) takes ``load(names, into)`` with such buffers by name."""
        ...


class SafetensorsWeights:
    """The tensors of a folder's ``*.safetensors`` files, read a few at a time (never all at once).

    They are views of the file's memory map: while one lives, the pages it touched count as the process's.
    """

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                self.where.update(dict.fromkeys(handle.keys(), path))

    def names(self) -> list[str]:
        return list(self.where)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        found = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as handle:
                found.update({name: handle.get_tensor(name) for name in group})
        return found


def empty_model(cls: type, config: Any) -> nn.Module:
    """A model of ``cls`` for ``config`` with its weights on the meta device (buffers such as rotary tables real)."""
    from streamify.io.config import instantiate

    with init_empty_weights(include_buffers=False):
        return instantiate(cls, config)


class _Stop(Exception):
    """Raised by the hook on the first block: the rest of the model need not run."""


class BlockExecutor:
    """Runs ``model`` block by block; with a ``source``, each block's weights live only while it runs.

    ``dtype`` casts floating-point tensors as they are brought in (None keeps the stored dtype).
    """

    def __init__(
        self,
        model: nn.Module,
        source: WeightSource | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.source, self.device, self.dtype = model, source, torch.device(device), dtype
        self.prefix, self.blocks = block_list(model, type(model).__name__)
        names = source.names() if source is not None else []
        self.block_names = [[n for n in names if n.startswith(f"{self.prefix}.{i}.")] for i in range(len(self.blocks))]
        inside = {n for group in self.block_names for n in group}
        self.resident = [n for n in names if n not in inside]
        self.held: set[int] = set()  # blocks inside a ``with block(i)``: running them neither brings nor drops

    def load_resident(self) -> None:
        """Bring in every tensor outside the block list (embeddings, final norm, head)."""
        if self.source is not None:  # copies: they live all run, and a view would keep the whole file mapped
            self._place({name: value.clone() for name, value in self.source.load(self.resident).items()})

    def bring(self, index: int) -> None:
        """Bring block ``index``'s tensors in from the source."""
        if self.source is not None:
            self._place(self.source.load(self.block_names[index]))

    def drop(self, index: int, trim: bool = True) -> None:
        """Send block ``index``'s parameters back to the meta device (memory freed; ``trim``: given back
        to the system)."""
        if self.source is None:
            return
        for name in self.block_names[index]:
            owner_name, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(owner._parameters[leaf].to("meta"), requires_grad=False)
        if trim:
            return_freed_memory()

    @contextlib.contextmanager
    def block(self, index: int):
        """Block ``index`` with its weights in, for the duration of the ``with`` (the outermost one, if nested)."""
        if index in self.held:
            yield self.blocks[index]
            return
        self.bring(index)
        self.held.add(index)
        try:
            yield self.blocks[index]
        finally:
            self.held.discard(index)
            self.drop(index)

    def release_embeddings(self) -> list[str]:
        """Send the input embeddings and output head to the meta device (blocks never use them, and on a
        large vocabulary they can outweigh several blocks); the stored names to read them back by, none
        without a source (a model in memory keeps them)."""
        if self.source is None:
            return []
        heads = {self.model.get_input_embeddings(), self.model.get_output_embeddings()} - {None}
        owned = {n: m for n, m in self.model.named_modules() if m in heads and m.weight.device.type != "meta"}
        for module in owned.values():
            module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)
        return_freed_memory()
        return [n for n in self.resident if n.rpartition(".")[0] in owned]

    @contextlib.contextmanager
    def embeddings_away(self):
        """The input embeddings and output head released for the ``with``, read back (and re-tied) after."""
        stored = self.release_embeddings()
        try:
            yield
        finally:
            if stored:
                self._place(self.source.load(stored))
                tie_shared(self.model)

    def hook(self) -> None:
        """Make the model's own forward bring each block in before it runs and drop it after (lazy loading).

        While a block runs, a background thread reads (decodes) the next one
        (block 0 after the last, for the next forward), so reading overlaps
        compute; at most two blocks' tensors are in memory.
        """
        if self.source is None:  # a model in memory: nothing to bring in or drop
            return
        ahead = _Prefetcher(self.source, self.block_names)

        def bring(index: int) -> None:
            tensors = ahead.take(index)
            if len(self.blocks) > 1:  # one block: nothing else to read ahead (its own buffers are in use)
                ahead.start((index + 1) % len(self.blocks))
            self._place(tensors)

        def drop(index: int) -> None:  # recycled buffers are not freed: give memory back once a forward
            self.drop(index, trim=not ahead.recycles or index == len(self.blocks) - 1)
            if torch.is_grad_enabled():  # the autograd graph may hold them for the backward pass: never reused
                ahead.forget(index)
            else:
                ahead.release(index)

        for index, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda module, args, i=index: bring(i))
            block.register_forward_hook(lambda module, args, output, i=index: drop(i))

    def first_inputs(self, batches: Iterable, forward: Callable[[nn.Module, object], object]) -> list[tuple]:
        """``(hidden, args, kwargs)`` entering block 0 for each batch; ``forward(model, batch)`` runs the model."""
        captured: list[tuple] = []

        def grab(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append((hidden, args[1:], kwargs))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for batch in batches:
                with contextlib.suppress(_Stop):
                    forward(self.model, batch)
        finally:
            handle.remove()
        return captured

    def run_block(self, index: int, inputs: list[tuple]) -> list[tuple]:
        """Block ``index`` on each of ``inputs`` (as :meth:`first_inputs` gives them): its outputs, same form."""
        outputs = []
        with self.block(index) as block:
            for hidden, args, kwargs in inputs:
                out = block(hidden, *args, **kwargs)
                outputs.append((out[0] if isinstance(out, tuple) else out, args, kwargs))
        return outputs

    def _place(self, tensors: dict[str, torch.Tensor]) -> None:
        place_tensors(self.model, tensors, self.device, self.dtype)


class _Prefetcher:
    """Reads one block's tensors ahead, in a background thread (the decoders and torch release the GIL).

    A source that writes into given buffers (``layout`` and ``load(names, into)``: a coded container, INT4
    weights being dequantized) gets each block's buffers back once the block has run, for the block after
    next: decoding then writes into pages the process already holds instead of faulting fresh ones in, and
    nothing is freed and trimmed block after block (measured on SmolLM2: ~0.2 s a forward pass on 2 cores).
    """

    def __init__(self, source: WeightSource, block_names: list[list[str]]) -> None:
        self.source, self.block_names = source, block_names
        self.recycles = hasattr(source, "layout")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="streamify-prefetch")
        self.pending: tuple[int, Future] | None = None
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lent: dict[int, list[torch.Tensor]] = {}

    def start(self, index: int) -> None:
        """Begin reading block ``index``."""
        self.pending = (index, self.pool.submit(self._reader(index)))

    def take(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors: the ones read ahead if they are that block's (a read error surfaces
        here), else read now (a forward that skipped or repeated blocks)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == index:
            return pending[1].result()
        if pending is not None:  # its buffers are free again only once it has stopped writing them
            contextlib.suppress(Exception)(pending[1].result)()
            self.release(pending[0])
        return self._reader(index)()

    def release(self, index: int) -> None:
        """Block ``index`` has run (its parameters are on the meta device): its buffers can be reused."""
        for buffer in self.lent.pop(index, []):
            self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)

    def forget(self, index: int) -> None:
        """Block ``index`` has run in a forward that records gradients: its buffers are left to whoever holds
        them (freed with the graph), not reused."""
        self.lent.pop(index, None)

    def _reader(self, index: int) -> Callable[[], dict[str, torch.Tensor]]:
        names = self.block_names[index]
        if not self.recycles:
            return functools.partial(self.source.load, names)
        buffers = {}
        with torch.inference_mode(False):  # plain tensors, whatever mode the forward runs in
            for name, (shape, dtype) in self.source.layout(names).items():
                pile = self.free.get((tuple(shape), dtype))
                buffers[name] = pile.pop() if pile else torch.empty(shape, dtype=dtype)
        self.free.clear()  # what this block did not take (blocks of other shapes) is freed, not hoarded
        self.lent.setdefault(index, []).extend(buffers.values())
        return functools.partial(self.source.load, names, buffers)


def place_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None
) -> None:
    """Put ``tensors`` (by qualified name) into ``model`` as frozen parameters or buffers on ``device``.

    ``dtype`` casts floating-point tensors (None keeps theirs).
    """
    for name, value in tensors.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        held = owner._parameters.get(leaf, owner._buffers.get(leaf))
        if held is not None and held.shape != value.shape:
            raise InputError(
                f"{name}: stored as {list(value.shape)}, the model's is {list(held.shape)}",
                "the weight files do not match config.json; re-create the checkpoint",
            )
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value.to(device), requires_grad=False)
        else:
            owner._buffers[leaf] = value.to(device)


def tie_shared(model: nn.Module) -> None:
    """Tie shared weights as the model's library does (transformers); diffusers models share none."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def check_complete(model: nn.Module, where: str, skip: str | None = None) -> None:
    """Refuse a model with weights still on the meta device (outside the block list ``skip``, loaded lazily)."""
    missing = sorted(
        n for n, p in model.named_parameters() if p.device.type == "meta" and not (skip and n.startswith(f"{skip}."))
    )
    if missing:
        raise InputError(
            f"{where}: {len(missing)} weights are missing, e.g. {', '.join(missing[:5])}",
            "the weight files do not match config.json; re-create the checkpoint",
        )


def lazy_model(
    model: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype | None, where: str
) -> nn.Module:
    """``model`` (built on the meta device) made to run with one block's weights at a time, read from ``source``."""
    deferred_blocks(model, source, device, dtype, where).hook()
    return model


def return_freed_memory() -> None:
    """Give the pages of freed tensors back to the system (Linux with glibc; nothing elsewhere).

    glibc keeps freed heap memory counted in the process: a block's tensors
    freed in the middle of the heap stay resident, and the heap grows block
    after block (measured: +25 MB of RSS a block on a 400 MB model read block by
    block, against +6.5 MB of output actually kept). ``malloc_trim`` returns
    every whole free page.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library (musl): it has its own policy
        return None


def deferred_blocks(
    model: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype | None, where: str
) -> BlockExecutor:
    """The executor of ``model`` (built on the meta device) with the tensors outside its blocks read from
    ``source``; each block stays on the meta device until the executor brings it in."""
    known = set(model.state_dict(keep_vars=True))
    unknown = sorted(n for n in source.names() if n not in known)
    if unknown:
        raise InputError(
            f"{where}: {len(unknown)} weights are not the model's, e.g. {', '.join(unknown[:5])}",
            "the weight files do not match config.json; re-create the checkpoint",
        )
    executor = BlockExecutor(model, source, device, dtype)
    executor.load_resident()
    tie_shared(model)
    check_complete(model, where, skip=executor.prefix)
    model.eval()
    return executor
