"""One recipe over many checkpoints: each in its own process, past failures, one aggregate report.

Each model runs as ``python -m streamify run RECIPE ... model=M output=OUT_ROOT/NAME``
so a crash, an out-of-memory kill or a bad checkpoint stops only that model.
Its log goes to ``OUT_ROOT/logs/NAME.log``; the aggregate (per model: status,
exit code, eval, gates, artifact path) to ``OUT_ROOT/batch.json``.

Across machines, ``shard=(I, N)`` runs the I-th of N contiguous slices of the
model list (a CI matrix or a scheduler array job gives each machine one) and
writes ``OUT_ROOT/batch-shard-I-of-N.json``; :func:`merge_reports` joins the N
shard reports into the report one unsharded batch would have written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamify.errors import ExitCode, UsageError
from streamify.io.manifest import read_manifest
from streamify.pipeline.recipe import load_recipe
from streamify.progress import SILENT, Progress

REPORT_NAME = "batch.json"
SHARD_PATTERN = "batch-shard-*-of-*.json"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) as ``(I, N)``; a :class:`UsageError` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard {text}: not I/N with 1 <= I <= N", "e.g. --shard 1/4 for the first of four")
    return int(match[1]), int(match[2])


def shard_slice(models: list[str], shard: tuple[int, int]) -> list[str]:
    """The ``I``-th of ``N`` contiguous, near-equal slices of ``models`` (the first ones one longer)."""
    index, count = shard
    size, extra = divmod(len(models), count)
    start = (index - 1) * size + min(index - 1, extra)
    return models[start : start + size + (index <= extra)]


def report_name(shard: tuple[int, int] | None) -> str:
    """The report file of a batch, or of one shard of it."""
    return REPORT_NAME if shard is None else f"batch-shard-{shard[0]}-of-{shard[1]}.json"


def output_name(model: str) -> str:
    """The artifact folder name for a model spec: folder or file stem, alias name, or ``org--name``."""
    if model.startswith("builtin:"):
        name = model.removeprefix("builtin:")
    else:
        path = Path(model).expanduser()
        name = path.stem if path.suffix == ".gguf" else path.name if path.exists() else model.replace("/", "--")
    return re.sub(r"[^\w.-]+", "_", name) or "model"


def read_models_file(path: Path) -> list[str]:
    """Model specs from a file: one a line, ``#`` comments and blank lines skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--models-file {path}: cannot read it ({exc})", "pass a text file, one model a line") from exc
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def plan_outputs(models: list[str], out_root: Path) -> dict[str, Path]:
    """Model spec -> artifact folder; two models that would share a folder are a :class:`UsageError`."""
    if not models:
        raise UsageError("batch: no models given", "pass --models M1 M2 ... or --models-file FILE")
    outputs: dict[str, Path] = {}
    for model in models:
        out = out_root / output_name(model)
        clash = next((m for m, o in outputs.items() if o == out), None)
        if clash is not None:
            raise UsageError(
                f"batch: {clash} and {model} would both write {out}",
                "rename one of the folders, or run them in two batches",
            )
        outputs[model] = out
    return outputs


def _run_one(model: str, out: Path, command: list[str], logs: Path) -> dict:
    log = logs / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "w") as stderr:
        done = subprocess.run(
            [*command, f"model={model}", f"output={out}"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    entry = {
        "model": model,
        "output": str(out),
        "status": "ok" if done.returncode == 0 else "failed",
        "exit_code": done.returncode,
        "seconds": round(time.perf_counter() - started, 3),
        "log": str(log),
    }
    try:
        summary = json.loads(done.stdout)
    except json.JSONDecodeError:
        summary = {}
    if done.returncode != 0:
        entry["error"] = summary.get("error") or _last_line(log)
        entry["hint"] = summary.get("hint")
    manifest = read_manifest(out)
    if manifest is not None:  # also after a failed gate: the artifact was written with its results
        entry.update(eval=manifest.get("eval"), eval_source=manifest.get("eval_source"), gates=manifest.get("gates"))
    else:
        entry["output"] = None
    return entry


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output (killed?)"


def run_batch(
    recipe: str,
    models: list[str],
    out_root: Path,
    *,
    overrides: list[str] | None = None,
    jobs: int = 1,
    overwrite: bool = False,
    use_cache: bool = True,
    shard: tuple[int, int] | None = None,
    progress: Progress = SILENT,
) -> dict:
    """Apply ``recipe`` to every model (or to ``shard``'s slice of them); returns the aggregate report (also
    written to ``out_root/batch.json``, or ``out_root/batch-shard-I-of-N.json``).

    The recipe and overrides are validated once before any model runs. The
    report's ``exit_code`` is 0 when every model succeeded, else the exit code
    of the first model that failed (1 if a signal killed it).
    """
    overrides = list(overrides or [])
    plan_outputs(models, out_root.expanduser().resolve())  # names clash across the whole list, not per shard
    everything = len(models)
    if shard is not None:
        models = shard_slice(models, shard)
        if not models:
            raise UsageError(
                f"--shard {shard[0]}/{shard[1]}: no models fall in this shard ({everything} models in all)",
                "use at most as many shards as models",
            )
    outputs = plan_outputs(models, out_root.expanduser().resolve())
    load_recipe(recipe, [*overrides, f"model={models[0]}", f"output={next(iter(outputs.values()))}"])
    logs = out_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "streamify", "run", recipe, *overrides, "--format", "json"]
    command += ["--overwrite"] * overwrite + ["--no-cache"] * (not use_cache)
    progress.log(f"batch: {len(models)} models, {jobs} at a time, into {out_root}")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_run_one, m, o, command, logs) for m, o in outputs.items()]
        results = []
        for future in progress.track(futures, "models", total=len(futures)):
            results.append(future.result())
            last = results[-1]
            progress.log(f"{last['model']}: {last['status']} (exit {last['exit_code']}, {last['seconds']:.1f} s)")
    report = _aggregate(recipe, overrides, out_root, results, round(time.perf_counter() - started, 3))
    if shard is not None:
        report["shard"] = {"index": shard[0], "count": shard[1], "models_in_all": everything}
    _write(out_root / report_name(shard), report)
    return report


def _aggregate(recipe: str, overrides: list[str], out_root: Path, results: list[dict], seconds: float) -> dict:
    failed = [r for r in results if r["status"] != "ok"]
    return {
        "recipe": recipe,
        "overrides": overrides,
        "out_root": str(out_root),
        "models": results,
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "exit_code": (failed[0]["exit_code"] if failed[0]["exit_code"] > 0 else int(ExitCode.INTERNAL))
        if failed
        else int(ExitCode.OK),
        "seconds": seconds,
    }


def _write(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


def merge_reports(sources: list[Path], out_root: Path) -> dict:
    """Join the shard reports found in ``sources`` (folders holding ``batch-shard-I-of-N.json``, or the files
    themselves) into one report, written to ``out_root/batch.json``: the models in the order of the
    unsharded list, one exit code. Every shard 1..N must be there once, all of one recipe and overrides."""
    if not sources:
        raise UsageError("batch merge: no shard reports given", "pass the folders the shards wrote: batch merge DIR...")
    files: list[Path] = []
    for source in sources:
        found = sorted(source.glob(SHARD_PATTERN)) if source.is_dir() else [source]
        if not found or not all(f.is_file() for f in found):
            raise UsageError(f"batch merge: {source} holds no {SHARD_PATTERN} report", "pass shard output folders")
        files += found
    reports = []
    for file in files:
        try:
            report = json.loads(file.read_text())
            shard = (int(report["shard"]["index"]), int(report["shard"]["count"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"batch merge: {file} is not a shard report ({exc})", "pass batch --shard outputs"
            ) from exc
        report["shard"]["index"], report["shard"]["count"] = shard
        reports.append(report)
    counts = {r["shard"]["count"] for r in reports}
    kinds = {(r["recipe"], tuple(r["overrides"])) for r in reports}
    if len(counts) != 1 or len(kinds) != 1:
        raise UsageError(
            "batch merge: the reports come from different batches (recipe, overrides or shard count differ)",
            "merge the shards of one batch",
        )
    indices = sorted(r["shard"]["index"] for r in reports)
    (count,) = counts
    if indices != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(indices))
        twice = sorted({i for i in indices if indices.count(i) > 1})
        raise UsageError(
            f"batch merge: shards of {count}: missing {missing or 'none'}, given twice {twice or 'none'}",
            "pass each shard's report exactly once",
        )
    reports.sort(key=lambda r: r["shard"]["index"])
    results = [row for report in reports for row in report["models"]]
    listed = {r["shard"].get("models_in_all") for r in reports}
    if len(listed) != 1 or listed != {len(results)}:
        raise UsageError(
            f"batch merge: the shards hold {len(results)} models but were cut from lists of {sorted(listed, key=str)}",
            "merge the shards of one batch, run over one model list",
        )
    recipe, overrides = next(iter(kinds))
    merged = _aggregate(recipe, list(overrides), out_root, results, max(r["seconds"] for r in reports))
    merged["merged_from"] = [str(f) for f in files]
    out_root.mkdir(parents=True, exist_ok=True)
    _write(out_root / REPORT_NAME, merged)
    return merged
