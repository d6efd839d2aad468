"""The stage registry: every stage is a pydantic ``Params`` model plus a ``run`` function."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.progress import SILENT, Progress

STAGE_MARK = "@register("  # a module that defines a stage says so: found, never listed by hand


@dataclass
class StageContext:
    """What a stage gets besides its checkpoint and params; it records its metrics in ``metrics``.

    ``use_cache`` False (``--no-cache``) also turns off checkpoints inside the stage.
    """

    device: torch.device
    seed: int
    data: str
    use_cache: bool = True
    progress: Progress = SILENT
    metrics: dict = field(default_factory=dict)


RunFn = Callable[[Checkpoint, BaseModel, StageContext], Checkpoint]


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    ``relation`` is the model card's ``base_model_relation`` for an artifact made
    by this stage (None when no Hub relation fits); ``bytes_per_param`` estimates
    the stored bytes per parameter after the stage, given its params and the
    bytes before (for the plan's disk estimate); ``training`` returns the
    healing the stage will run as ``(HealParams, default seq_len)``, or None
    (for the plan's memory estimate and module patterns).
    """

    name: str
    params: type[BaseModel]
    run: RunFn
    summary: str
    relation: str | None = None
    bytes_per_param: Callable[[BaseModel, float], float] = lambda params, before: before
    training: Callable[[BaseModel], tuple[Any, int] | None] = lambda params: None
    final: bool = False


_REGISTRY: dict[str, Stage] = {}


def register(name: str, params: type[BaseModel], summary: str, **options) -> Callable[[RunFn], RunFn]:
    """Decorator that registers ``run`` as the stage ``name``."""

    def wrap(run: RunFn) -> RunFn:
        _REGISTRY[name] = Stage(name, params, run, summary, **options)
        return run

    return wrap


@cache
def stage_modules() -> tuple[str, ...]:
    """The modules of the package that register stages: those whose source applies :func:`register`.

    Read as text, so only those modules are imported (importing every module
    would slow every command down).
    """
    import streamify

    found = []
    for info in pkgutil.walk_packages(streamify.__path__, "streamify."):
        if info.ispkg:
            continue
        path = Path(info.module_finder.path) / f"{info.name.rpartition('.')[2]}.py"
        if path.is_file() and STAGE_MARK in path.read_text() and info.name != __name__:
            found.append(info.name)
    return tuple(sorted(found))


def all_stages() -> dict[str, Stage]:
    """Every registered stage by name."""
    for module in stage_modules():
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get_stage(name: str) -> Stage:
    """The stage called ``name``; a :class:`UsageError` listing the valid names otherwise."""
    stages = all_stages()
    if name not in stages:
        raise UsageError(f"unknown stage '{name}'", f"valid stages: {', '.join(stages)}")
    return stages[name]
