"""The stage registry: every stage is a pydantic ``Params`` model plus a ``run`` function."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.progress import SILENT, Progress

if TYPE_CHECKING:  # torch is imported by the stages themselves; listing them stays light
    import torch

STAGE_MARK = "@register("  # a module that defines a stage says so: found, never listed by hand
_STAGE_NAME = re.compile(r'@register\(\s*"([a-z0-9_]+\.[a-z0-9_]+)"')


@dataclass
class StageContext:
    """What a stage gets besides its checkpoint and params; it records its metrics in ``metrics``.

    ``use_cache`` False (``--no-cache``) also turns off checkpoints inside the stage. ``artifact_dir`` is
    the artifact folder being written, for a stage that writes its files as it goes (block-wise).
    ``run_resources`` holds what must last until the run ends, written or failed (a lock): the runner closes it.
    """

    device: torch.device
    seed: int
    data: str
    use_cache: bool = True
    progress: Progress = SILENT
    metrics: dict = field(default_factory=dict)
    artifact_dir: Path | None = None
    run_resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


RunFn = Callable[[Checkpoint, BaseModel, StageContext], Checkpoint]


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    ``relation`` is the model card's ``base_model_relation`` for an artifact made
    by this stage (None when no Hub relation fits); ``bytes_per_param`` estimates
    the stored bytes per parameter after the stage, given its params, the
    bytes before and the model (on the meta device), for the plan's disk estimate; ``training`` returns the
    healing the stage will run as ``(HealParams, default seq_len, keeps a teacher copy)``, or None
    (for the plan's memory estimate and module patterns); ``applies`` says why
    the stage cannot run on a model (built on the meta device), or None when it can;
    ``check(params, model, where)`` checks the params against that model before any
    weight is read (raising a clear error) and returns what it resolved for the plan;
    ``reshapes`` marks a stage after which the source's shapes no longer hold; ``trains`` marks params
    with which a stage trains outside ``training`` (see :func:`trains`); ``blockwise``, for a stage that can
    run on a model read block by block from disk (``Checkpoint.blocks``), gives for its params and the model
    the mode asked for (auto, on, off), what in them rules it out (None when nothing does) and the working
    memory of one block (activations, statistics) in bytes; ``holds``, for a stage that trains outside
    ``training``, gives for its params, the model's bytes in memory and its parameter count the peak memory of
    the weights and optimizer states it keeps (activations not counted) and what they are, for the plan;
    ``progress_in_cache`` marks a stage whose block-wise run keeps its output (up to the artifact's size) under
    the cache until it ends, so that a killed run resumes.
    """

    name: str
    params: type[BaseModel]
    run: RunFn
    summary: str
    relation: str | None = None
    bytes_per_param: Callable[[BaseModel, float, Any], float] = lambda params, before, model: before
    training: Callable[[BaseModel], tuple[Any, int, bool] | None] = lambda params: None
    kinds: tuple[str, ...] | Literal["all"] = ("causal-lm",)
    applies: Callable[[Any], str | None] = lambda model: None
    check: Callable[[BaseModel, Any, str], dict | None] = lambda params, model, where: None
    reshapes: bool = False
    final: bool = False
    trains: Callable[[BaseModel], bool] = lambda params: False
    blockwise: Callable[[BaseModel, Any], tuple[str, str | None, int]] | None = None
    holds: Callable[[BaseModel, int, int], tuple[int, str]] | None = None
    progress_in_cache: bool = False


def trains(stage: Stage, params: BaseModel) -> bool:
    """Whether ``stage`` runs the training loop with ``params`` (under a launcher every process takes part):
    it heals (``training``) or says so (``trains``)."""
    return stage.training(params) is not None or stage.trains(params)


_REGISTRY: dict[str, Stage] = {}


def why_not(stage: Stage, model: Any) -> str | None:
    """Why ``stage`` cannot run on ``model`` (its kind, then the stage's own check), or None when it can."""
    if stage.kinds != "all":
        from streamify.kinds import find_kind

        kind = find_kind(model)
        if kind is None or kind.name not in stage.kinds:
            what = f"is {kind.name}" if kind else f"({type(model).__name__}) is none streamify handles"
            return f"applies to {' and '.join(stage.kinds)} models; this model's kind {what}"
    return stage.applies(model)


def register(name: str, params: type[BaseModel], summary: str, **options) -> Callable[[RunFn], RunFn]:
    """Decorator that registers ``run`` as the stage ``name``."""

    def wrap(run: RunFn) -> RunFn:
        _REGISTRY[name] = Stage(name, params, run, summary, **options)
        return run

    return wrap


@cache
def stage_names() -> dict[str, str]:
    """Every stage's name and the module that registers it, found by reading the package's sources.

    Read as text, so nothing is imported: the CLI lists stage commands without
    loading torch, and running one imports only its own module.
    """
    import streamify

    found = {}
    for info in pkgutil.walk_packages(streamify.__path__, "streamify."):
        path = Path(info.module_finder.path) / f"{info.name.rpartition('.')[2]}.py"
        if info.ispkg or info.name == __name__ or not path.is_file():
            continue
        text = path.read_text()
        if STAGE_MARK in text:
            found.update(dict.fromkeys(_STAGE_NAME.findall(text), info.name))
    return dict(sorted(found.items()))


def stage_modules() -> tuple[str, ...]:
    """The modules of the package that register stages."""
    return tuple(sorted(set(stage_names().values())))


def all_stages() -> dict[str, Stage]:
    """Every registered stage by name."""
    for module in stage_modules():
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get_stage(name: str) -> Stage:
    """The stage called ``name`` (importing only its module); a :class:`UsageError` listing the valid names."""
    names = stage_names()
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown stage '{name}'{guess}", f"valid stages: {', '.join(names)}")
    importlib.import_module(names[name])
    return _REGISTRY[name]
