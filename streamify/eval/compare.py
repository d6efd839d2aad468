"""Evaluate one model, or two on exactly the same tokens, as ``streamify eval`` does."""

from __future__ import annotations

import time

from streamify.errors import UsageError
from streamify.eval.report import EvalSpec, eval_data, evaluate
from streamify.io.load import load_checkpoint
from streamify.progress import SILENT, Progress

_RATIO_KEYS = ("perplexity", "nll", "size_bytes", "bits_per_weight", "params", "load_seconds")


def _load(spec: str, options: dict, progress: Progress):
    progress.log(f"loading {spec}")
    started = time.perf_counter()
    checkpoint = load_checkpoint(spec, progress=progress, **options)
    return checkpoint, time.perf_counter() - started


def evaluate_models(model: str, vs: str | None, spec: EvalSpec, options: dict, progress: Progress = SILENT) -> dict:
    """Eval report of ``model``; with ``vs``, also of ``vs`` on the same inputs, their ratios and how close they are.

    Ratios are ``model / vs``. The two models must be of one kind and read the
    eval data the same way (a shared tokenizer: the same ids for the eval text),
    or the comparison would not be on the same inputs. Kinds with comparable
    outputs (embeddings, denoiser predictions) also report ``model`` against ``vs``
    (``cosine_to_reference_mean``...).
    """
    checkpoint, seconds = _load(model, options, progress)
    data = eval_data(checkpoint, spec)
    kind = checkpoint.kind
    size = checkpoint.source.size_bytes()
    report, outputs = evaluate(checkpoint, spec, size_bytes=size, load_seconds=seconds, data=data, progress=progress)
    result = {"model_spec": model, "model": report}
    if vs is None:
        return result
    del checkpoint
    other, other_seconds = _load(vs, {**options, "verify": False}, progress)  # --verify is about MODEL
    if other.kind is not kind:
        raise UsageError(
            f"--vs {vs}: a {other.kind.name} model; {model} is a {kind.name}", "compare models of one kind"
        )
    if not kind.same_data(eval_data(other, spec), data):
        raise UsageError(
            f"--vs {vs}: it reads the eval data into different inputs than {model} (another tokenizer?)",
            "compare models that share a tokenizer",
        )
    other_size = other.source.size_bytes()
    other_report, other_outputs = evaluate(
        other, spec, size_bytes=other_size, load_seconds=other_seconds, data=data, progress=progress
    )
    if outputs is not None:
        report.update(kind.compare(outputs, other_outputs))
    keys = [*_RATIO_KEYS, *(k for k in report if k.startswith("tasks."))]
    ratio = {k: report[k] / other_report[k] for k in keys if report.get(k) and other_report.get(k)}
    return {**result, "vs_spec": vs, "vs": other_report, "ratio": ratio}
