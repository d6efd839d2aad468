"""Task-level evaluation through lm-evaluation-harness, on the model already loaded.

``lm-eval`` (the ``tasks`` extra) scores a causal LM on its tasks (ARC,
HellaSwag, MMLU, ... or tasks defined in local YAML files found through
``tasks_path``); its Python API takes our loaded model and tokenizer, so an
artifact streamify loads (INT4, GGUF, entropy-coded, streaming) is scored as
it runs here. Results come back as ``tasks.<task>.<metric>`` keys of the eval
report, with lm-eval's metric names (``acc``, ``acc_norm``, ``acc_stderr``...).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from streamify.errors import InputError, UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.progress import SILENT, Progress

INSTALL = "pip install 'streamify[tasks]'  (lm-eval, the harness the tasks come from)"


def _harness():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(f"--tasks needs lm-eval, which is not installed ({exc})", INSTALL) from exc
    return simple_evaluate, HFLM, TaskManager


@contextlib.contextmanager
def _quiet(bars: bool) -> Iterator[None]:
    """lm-eval's log lines off; its and datasets' progress bars (written to stderr) only on a terminal."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(sys.stderr if bars else io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _flatten(results: dict) -> dict:
    """``{"task": {"acc,none": x}}`` -> ``{"tasks.task.acc": x}`` (a filter other than ``none`` is kept)."""
    found = {}
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, int | float):
                continue
            metric, _, kept = key.partition(",")
            name = metric if kept in ("", "none") else f"{metric}.{kept}"
            found[f"tasks.{task}.{name}"] = value
    return found


def run_tasks(
    checkpoint: Checkpoint,
    tasks: list[str],
    tasks_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    progress: Progress = SILENT,
) -> dict:
    """lm-eval's scores of ``checkpoint`` on ``tasks`` as flat ``tasks.<task>.<metric>`` keys.

    ``tasks_path`` is a folder of task YAML files to add to lm-eval's own;
    ``limit`` scores only the first N documents of each task.
    """
    simple_evaluate, hflm, task_manager = _harness()
    if checkpoint.tokenizer is None:
        raise InputError(f"{checkpoint.source.spec}: --tasks needs a tokenizer", "use a checkpoint with one")
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise InputError(f"--tasks-path {tasks_path}: no such folder", "give a folder of lm-eval task YAML files")
    bars = sys.stderr.isatty()
    with _quiet(bars):
        manager = task_manager(include_path=tasks_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"--tasks: lm-eval has no task {', '.join(map(repr, unknown))}"
            + (f" (its own or under {tasks_path})" if tasks_path else ""),
            "list them with: python -m lm_eval ls tasks; local task YAML files go under --tasks-path DIR",
        )
    progress.log(f"lm-eval: {', '.join(tasks)}" + (f" (first {limit} documents each)" if limit else ""))
    try:
        with _quiet(bars):
            out = simple_evaluate(
                model=hflm(pretrained=checkpoint.model, tokenizer=checkpoint.tokenizer, batch_size=batch_size),
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                log_samples=False,
            )
    except (OSError, ConnectionError) as exc:  # a hub dataset while offline, a missing local data file
        raise InputError(
            f"--tasks {','.join(tasks)}: lm-eval could not read a task's data ({exc})",
            "run online once to cache the data sets, or define the task on local files (--tasks-path)",
        ) from exc
    return _flatten(out["results"])
