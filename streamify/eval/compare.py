"""Evaluate one model, or two on exactly the same tokens, as ``streamify eval`` does."""

from __future__ import annotations

import time

from streamify.errors import UsageError
from streamify.eval.report import EvalSpec, eval_blocks, evaluate
from streamify.io.load import load_checkpoint
from streamify.progress import SILENT, Progress

_RATIO_KEYS = ("perplexity", "nll", "size_bytes", "bits_per_weight", "params", "load_seconds")


def _load(spec: str, options: dict, progress: Progress):
    progress.log(f"loading {spec}")
    started = time.perf_counter()
    checkpoint = load_checkpoint(spec, progress=progress, **options)
    return checkpoint, time.perf_counter() - started


def evaluate_models(model: str, vs: str | None, spec: EvalSpec, options: dict, progress: Progress = SILENT) -> dict:
    """Eval report of ``model``; with ``vs``, also of ``vs`` on the same token windows, and their ratios.

    Ratios are ``model / vs``. The two models must share a tokenizer (same ids
    for the eval text), or the comparison would not be on the same tokens.
    """
    checkpoint, seconds = _load(model, options, progress)
    blocks = eval_blocks(checkpoint.tokenizer, spec)
    size = checkpoint.source.size_bytes()
    report = evaluate(checkpoint, spec, size_bytes=size, load_seconds=seconds, blocks=blocks, progress=progress)
    result = {"model_spec": model, "model": report}
    if vs is None:
        return result
    del checkpoint
    other, other_seconds = _load(vs, {**options, "verify": False}, progress)  # --verify is about MODEL
    other_blocks = eval_blocks(other.tokenizer, spec)
    if other_blocks.shape != blocks.shape or not bool((other_blocks == blocks).all()):
        raise UsageError(
            f"--vs {vs}: its tokenizer turns the eval text into different tokens than {model}'s",
            "compare models that share a tokenizer",
        )
    other_size = other.source.size_bytes()
    other_report = evaluate(
        other, spec, size_bytes=other_size, load_seconds=other_seconds, blocks=blocks, progress=progress
    )
    ratio = {k: report[k] / other_report[k] for k in _RATIO_KEYS if report.get(k) and other_report.get(k)}
    return {**result, "vs_spec": vs, "vs": other_report, "ratio": ratio}
