"""The eval report: the model kind's quality numbers plus size, parameters, load time and memory.

The report's keys are an interface (README.md, "Eval report"): ``kind``; for a
causal LM ``perplexity``, ``nll``, ``tokens``, ``seq_len``; for the other kinds
theirs (:mod:`streamify.kinds`: ``wer``, ``denoising_loss``, ``cosine_to_reference_mean``...);
``data``, ``params``, ``size_bytes``,
``bits_per_weight``, ``peak_memory_bytes``, ``load_seconds`` (only for a model loaded
from disk: an artifact evaluated in the run that made it has none); with ``stream_tokens``
also ``stream.perplexity``, ``stream.cache_bytes_max``, ``stream.latency_ms_first_10pct``,
``stream.latency_ms_last_10pct`` (and the rest of :func:`~streamify.eval.streaming.stream_eval`);
with ``equivalence`` also ``equivalence.max_abs_diff`` (:func:`~streamify.eval.streaming.check_equivalence`);
with ``tasks`` lm-eval's metrics as ``tasks.<task>.<metric>`` (:func:`~streamify.eval.tasks.run_tasks`).
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.kinds.causal_lm import CAUSAL_LM, DEFAULT_TEXT
from streamify.model.params import count_params
from streamify.progress import SILENT, Progress


class EvalSpec(BaseModel):
    """What to evaluate on: the model kind's data (``data``), windows of ``seq_len`` tokens or ``max_items`` items."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        None,
        description="eval data (default: the model kind's: builtin:pydoc's held-out split for text, "
        "builtin:random-latents for denoisers (or builtin:shapes for one in RGB pixels); speech needs a folder of "
        "clips with transcripts)",
    )
    max_tokens: int = Field(16384, gt=0, description="text: tokens to score, rounded down to whole windows")
    seq_len: int = Field(512, ge=2, description="text: window length; windows do not overlap")
    max_items: int = Field(32, gt=0, description="speech clips or denoiser samples to score")
    max_new_tokens: int | None = Field(
        None, gt=0, description="speech: most tokens decoded per clip (default: as many as the decoder holds)"
    )
    batch_size: int = Field(1, gt=0, description="windows per forward pass")
    stream_tokens: int = Field(
        0, ge=0, description="also stream this many held-out tokens through the runtime (0: off)"
    )
    stream_chunk: int = Field(16, gt=0, description="tokens fed per step when streaming")
    stream_kv_bits: Literal[4] | None = Field(None, description="4: stream with the recent keys/values in INT4")
    equivalence: bool = Field(
        False, description="streaming models: also check the chunked cached runtime against the StreamingLLM reference"
    )
    tasks: list[str] = Field(
        default_factory=list, description="causal LMs: also score these lm-eval tasks (needs the tasks extra)"
    )
    tasks_path: str | None = Field(None, description="a folder of lm-eval task YAML files to add to lm-eval's own")
    tasks_limit: int | None = Field(None, gt=0, description="score only the first N documents of each task")

    def text_data(self) -> str:
        """The text an eval of a text model reads (``data``, else builtin:pydoc)."""
        return self.data or DEFAULT_TEXT


def eval_data(checkpoint: Checkpoint, spec: EvalSpec) -> Any:
    """The inputs an eval of ``checkpoint`` scores: its kind's (token windows, clips, latents)."""
    return checkpoint.kind.eval_data(checkpoint, spec)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the accelerator's allocator peak, or this process's max RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def evaluate(
    checkpoint: Checkpoint,
    spec: EvalSpec,
    *,
    size_bytes: int,
    load_seconds: float | None = None,
    data: Any = None,
    reference: Any = None,
    progress: Progress = SILENT,
) -> tuple[dict, Any]:
    """Evaluate a checkpoint as its kind says: ``(report, outputs)``.

    ``data`` overrides the kind's eval data (to score two models on the same
    inputs); ``reference`` is another model's ``outputs`` on that data, which
    the report then compares against (cosine of embeddings, relative error of
    denoiser predictions).
    """
    model = checkpoint.model
    kind = checkpoint.kind
    params = count_params(model)
    report: dict = {
        "kind": kind.name,
        "params": params,
        "size_bytes": size_bytes,
        "bits_per_weight": size_bytes * 8 / params,
    }
    outputs = None
    if kind.reads_text and checkpoint.tokenizer is None and data is None:
        report["note"] = "the checkpoint has no tokenizer: the text eval is skipped"
        if kind.name == CAUSAL_LM:
            report["perplexity"] = None
    else:
        data = data if data is not None else eval_data(checkpoint, spec)
        metrics, outputs = kind.score(checkpoint, data, spec, progress)
        report.update(metrics, data=spec.data or kind.default_data)
        if reference is not None:
            report.update(kind.compare(outputs, reference))
    if spec.stream_tokens or spec.equivalence:
        report.update(_streaming_checks(checkpoint, spec, kind.name, progress))
    if spec.tasks:
        from streamify.eval.tasks import run_tasks

        if kind.name != CAUSAL_LM:
            raise UsageError(
                f"{checkpoint.source.spec}: lm-eval tasks score causal LMs; this is a {kind.name}", "leave out tasks"
            )
        report.update(
            run_tasks(checkpoint, spec.tasks, spec.tasks_path, spec.tasks_limit, spec.batch_size, progress=progress)
        )
    if load_seconds is not None:  # an artifact evaluated where it was made was never loaded
        report["load_seconds"] = round(load_seconds, 3)
    report["peak_memory_bytes"] = peak_memory_bytes(next(model.parameters()).device)
    return report, outputs


def _streaming_checks(checkpoint: Checkpoint, spec: EvalSpec, kind: str, progress: Progress) -> dict:
    from streamify.eval.streaming import check_equivalence, stream_eval

    if kind != CAUSAL_LM:
        raise UsageError(
            f"{checkpoint.source.spec}: the streaming eval and the equivalence check run causal LMs; this is a {kind}",
            "leave out eval.stream_tokens and eval.equivalence",
        )
    found = {}
    if spec.stream_tokens:
        streamed = stream_eval(
            checkpoint, spec.text_data(), spec.stream_tokens, spec.stream_chunk, progress, spec.stream_kv_bits
        )
        found.update({f"stream.{key}": value for key, value in streamed.items()})
    if spec.equivalence:
        checked = check_equivalence(checkpoint, spec.text_data(), None, [1, 7, 64], progress)
        found.update({f"equivalence.{key}": value for key, value in checked.items()})
    return found
