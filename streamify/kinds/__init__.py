"""Model kinds: what a model takes and gives, declared once per kind and found without a hand-kept list.

A :class:`Kind` tells the plan, eval and the stages how to feed a model of that
kind and how to judge it:

- ``check_eval(model, spec, where)``: refuse, before any weight is read, an eval
  the model cannot run (no audio for a speech model, windows past its positions);
- ``eval_data(checkpoint, spec)``: the inputs an eval scores (the same for two
  models of one family, so ``--vs`` compares them on the same inputs);
- ``score(checkpoint, data, spec, progress)``: the kind's quality numbers
  (perplexity, WER, denoising loss) and the outputs another model is compared on;
- ``compare(outputs, reference)``: how close two models' outputs are (cosine of
  embeddings, relative error of denoiser predictions), when the kind has such outputs.

Stages name the kinds they handle (``kinds`` on :func:`~streamify.pipeline.registry.register`).
Training batches and losses of the speech and denoiser kinds belong here too, with
the stages that first train them. Kinds are matched on the model built from the
config (on the meta device, so matching costs no memory); the lowest ``order``
whose ``matches`` accepts it wins.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from streamify.errors import InputError


class Kind:
    """One kind of model (see the module docstring). Subclasses set the class attributes and the methods."""

    name: str = ""
    summary: str = ""
    default_data: str | None = None  # what eval reads when no --data is given (None: the user must say)
    reads_text = False  # its eval data is text cut into token windows
    compares_to_source = False  # a run's eval measures the artifact against the source (:meth:`compare`)
    order: int = 100  # lower is tried first (a speech model is also a decoder)

    def matches(self, model: Any) -> bool:
        """True when ``model`` (possibly on the meta device) is of this kind."""
        raise NotImplementedError

    def check_eval(self, model: Any, spec: Any, where: str) -> None:
        """Refuse an eval ``spec`` the model cannot run (a :class:`~streamify.errors.UsageError`), before any weight."""

    def eval_data(self, checkpoint: Any, spec: Any) -> Any:
        """The inputs the eval of ``checkpoint`` scores, per ``spec`` (an :class:`~streamify.eval.report.EvalSpec`)."""
        raise NotImplementedError

    def same_data(self, data: Any, other: Any) -> bool:
        """True when two models' eval inputs are the same (so their numbers compare)."""
        return _same(data, other)

    def score(self, checkpoint: Any, data: Any, spec: Any, progress: Any) -> tuple[dict, Any]:
        """``(metrics, outputs)``: the quality numbers, and what :meth:`compare` reads (None when nothing)."""
        raise NotImplementedError

    def compare(self, outputs: Any, reference: Any) -> dict:
        """How close ``outputs`` are to a reference model's on the same data (empty: the kind has no such measure)."""
        return {}


def in_mapping(mapping: Any, model: Any) -> bool:
    """True when ``model``'s class is what a transformers auto ``mapping`` gives for its config class."""
    try:
        found = mapping[type(model.config)]
    except (KeyError, AttributeError):
        return False
    return type(model) in (found if isinstance(found, tuple | list) else (found,))


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@cache
def all_kinds() -> tuple[Kind, ...]:
    """Every kind, in the order they are tried."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "KINDS", ()))
    return tuple(sorted(found, key=lambda kind: (kind.order, kind.name)))


def find_kind(model: Any) -> Kind | None:
    """The kind of ``model``, or None when no kind accepts it."""
    return next((kind for kind in all_kinds() if kind.matches(model)), None)


def kind_of(model: Any, where: str) -> Kind:
    """The kind of ``model``; :class:`InputError` (exit 3) naming the kinds streamify handles when none fits."""
    kind = find_kind(model)
    if kind is None:
        raise InputError(
            f"{where}: {type(model).__name__} is none of the model kinds streamify handles",
            "kinds: " + "; ".join(f"{k.name} ({k.summary})" for k in all_kinds()),
        )
    return kind


def require_kind(checkpoint: Any, name: str, what: str) -> None:
    """Refuse (exit 3) a checkpoint that is not of kind ``name``, for ``what`` (e.g. "the streaming runtime")."""
    kind = checkpoint.kind
    if kind.name != name:
        raise InputError(
            f"{checkpoint.source.spec}: {what} runs {name} models; this model's kind is {kind.name}",
            f"streamify inspect {checkpoint.source.spec} lists what applies to it",
        )
