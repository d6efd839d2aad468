"""Forward hooks on a model's blocks: record the hidden states between them, or skip blocks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def recording(blocks: nn.ModuleList, states: list, detach: bool = True):
    """Record the hidden state entering every block and the one leaving the last, into ``states``.

    ``states[i]`` enters block ``i``; ``states[len(blocks)]`` leaves the last. With
    ``detach=False`` they keep their autograd history (for losses on them).
    """

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if detach else tensor

    def before(module, args, kwargs):
        states.append(keep(_hidden(args, kwargs)))

    def after(module, args, kwargs, output):
        states.append(keep(output[0] if isinstance(output, tuple) else output))

    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(after, with_kwargs=True))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _removed_after(handles: list):
    """Remove the hooks ``handles`` stand for when the block ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def skipping(blocks: nn.ModuleList, skip: list[int]):
    """Run the model with the blocks ``skip`` passing their input through unchanged."""

    def identity(module, args, kwargs, output):
        hidden = _hidden(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with _removed_after([blocks[i].register_forward_hook(identity, with_kwargs=True) for i in skip]):
        yield


@contextlib.contextmanager
def capturing(modules: list[nn.Module], inputs: list, outputs: list):
    """Record each module's hidden-state input and its (first) output, detached, in the order they run."""

    def keep(module, args, kwargs, output):
        inputs.append(_hidden(args, kwargs).detach())
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    with _removed_after([m.register_forward_hook(keep, with_kwargs=True) for m in modules]):
        yield


@contextlib.contextmanager
def muting(module: nn.Module):
    """Run the model with ``module``'s (first) output replaced by zeros: its contribution to the residual gone."""

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    with _removed_after([module.register_forward_hook(zero)]):
        yield
