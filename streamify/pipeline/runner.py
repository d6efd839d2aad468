"""The runner: validate, plan, load, run stages, write the artifact once, evaluate, check gates."""

from __future__ import annotations

import contextlib
import time

import torch
import transformers

from streamify.eval.report import eval_data, evaluate
from streamify.io.artifact import (
    check_output,
    output_lock,
    save_model_files,
    staged_folder,
    weights_size,
    write_manifest,
)
from streamify.io.checkpoint import Checkpoint
from streamify.io.load import load_checkpoint
from streamify.io.manifest import MANIFEST_NAME, build_manifest
from streamify.io.model_card import render_model_card
from streamify.io.placement import resolve_device
from streamify.io.source import resolve_source
from streamify.io.verify import verify_artifact
from streamify.pipeline.cache import StageCache, stage_keys
from streamify.pipeline.gates import check_gates, raise_on_failure
from streamify.pipeline.plan import build_plan, check_fits
from streamify.pipeline.processes import launched_processes, process_device, process_state
from streamify.pipeline.recipe import Recipe
from streamify.pipeline.registry import StageContext, trains
from streamify.progress import SILENT, Progress


def run_recipe(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    use_cache: bool = True,
    progress: Progress = SILENT,
) -> dict:
    """Run ``recipe`` end to end and return the run summary (the CLI's JSON output).

    With ``dry_run`` only the plan is made: no weights are loaded, nothing is
    written. With ``use_cache`` every stage's output is kept in the stage cache
    and a re-run starts after the last stage found there (training inside a
    stage resumes from its own checkpoint). Raises
    :class:`~streamify.errors.GateError` (exit 5) after writing the artifact
    when a gate fails.
    """
    source = resolve_source(recipe.model)
    processes = launched_processes()
    device = resolve_device(recipe.device)
    if processes > 1 and not dry_run:  # a dry run plans without joining the process group
        device = process_device(device)
        state = process_state(device)
        if not state.is_main_process:
            return _run_share(recipe, device, use_cache, state.process_index)
    if processes > 1 and device.type == "cpu" and torch.cuda.is_available():
        progress.log(f"warning: {processes} processes train on the CPU although this machine has GPUs: set device=cuda")
    out = check_output(recipe.output, source.folder, overwrite)
    # several processes must all run the stages before training: none reuses the stage cache (training resumes
    # from its own checkpoints)
    cache = StageCache() if use_cache and processes == 1 else None
    keys = stage_keys(recipe, source, device) if cache else None
    plan = build_plan(
        recipe, source, out, cache_hits=[cache.has(k) for k in keys] if cache else None, processes=processes
    )
    if dry_run:
        return {"dry_run": True, "plan": plan}
    check_fits(plan, out, progress, str(device))
    if recipe.verify and source.kind == "hf-folder" and (source.folder / MANIFEST_NAME).is_file():
        checked = verify_artifact(source.folder)
        progress.log(f"verified {checked['files']} files of {source.folder} against its manifest")
    with output_lock(out):
        return _run(recipe, source, out, device, cache, keys, overwrite, use_cache, plan, progress)


def _run(recipe, source, out, device, cache, keys, overwrite, use_cache, plan, progress) -> dict:
    """The run itself, under the output's lock (see :func:`run_recipe`), as ``plan`` says: evaluating the
    source too or not, holding the model in memory or reading it block by block."""
    vs_source, blockwise = plan["eval_vs_source"], plan["path"]["blockwise"]
    stages = recipe.resolved_stages()
    started = time.perf_counter()
    cacheable = [not stage.final for stage, _ in stages]
    resumed, checkpoint, records = -1, None, []
    if cache:
        resumed, checkpoint, records = cache.resume(keys, cacheable, source, recipe.device, progress)
    for index, record in enumerate(records):
        record["cache"] = "reused"
        progress.log(
            f"stage {index + 1}/{len(stages)}: {record['name']}: reused from the stage cache ({keys[index][:12]})"
        )
    load_seconds = None
    data, source_eval, source_outputs = None, None, None
    if resumed < 0 or vs_source:
        progress.log(f"loading {recipe.model}" + (" (blocks are read one at a time)" if blockwise else ""))
        source_checkpoint = _load_source(recipe, device, progress, blockwise)
        load_seconds = time.perf_counter() - started
        if vs_source:
            data = eval_data(source_checkpoint, recipe.eval)
            progress.log("evaluating the source")
            source_eval, source_outputs = evaluate(
                source_checkpoint,
                recipe.eval,
                size_bytes=source.size_bytes(),
                load_seconds=load_seconds,
                data=data,
                progress=progress,
            )
        if resumed < 0:
            checkpoint = source_checkpoint
        del source_checkpoint

    with contextlib.ExitStack() as run_resources, staged_folder(out, overwrite) as tmp:
        for index in range(resumed + 1, len(stages)):
            stage, params = stages[index]
            progress.log(f"stage {index + 1}/{len(stages)}: {stage.name}")
            transformers.set_seed(recipe.seed)  # per stage: a resumed run draws what an uninterrupted one does
            ctx = StageContext(
                device=device,
                seed=recipe.seed,
                data=recipe.data,
                use_cache=use_cache,
                progress=progress,
                artifact_dir=tmp,  # a block-wise stage writes its files as it goes
                run_resources=run_resources,
            )
            stage_start = time.perf_counter()
            checkpoint = stage.run(checkpoint, params, ctx)
            store = cache is not None and cacheable[index] and checkpoint.weights_writer is None
            records.append(
                {
                    "name": stage.name,
                    "params": params.model_dump(mode="json"),
                    "seconds": round(time.perf_counter() - stage_start, 3),
                    "metrics": ctx.metrics,
                    "cache": "stored" if store else "off",
                }
            )
            if store:
                cache.store(keys[index], checkpoint, records, progress)

        progress.log(f"writing {out}")
        save_model_files(checkpoint, tmp)
        report = None
        if recipe.eval is not None:
            progress.log("evaluating the artifact")
            report, _ = evaluate(
                checkpoint,
                recipe.eval,
                size_bytes=weights_size(tmp),
                data=data,
                reference=source_outputs,
                progress=progress,
            )
        gates = check_gates(recipe.gates, report, source_eval, source.size_bytes())
        manifest = build_manifest(
            checkpoint,
            stages=records,
            seed=recipe.seed,
            eval_report=report,
            source_eval=source_eval,
            gates=gates,
        )
        (tmp / "recipe.yaml").write_text(recipe.model_copy(update={"output": str(out)}).to_yaml())
        write_manifest(tmp, manifest)
        relation = next((s.relation for s, _ in reversed(stages) if s.relation), None)
        (tmp / "README.md").write_text(render_model_card(manifest, relation, tmp))
    summary = {
        "output": str(out),
        "stages": records,
        "eval": report,
        "eval_source": source_eval,
        "gates": gates,
        "seconds": round(time.perf_counter() - started, 3),
    }
    raise_on_failure(gates, str(out), summary)
    return summary


def _run_share(recipe: Recipe, device, use_cache: bool, rank: int) -> dict:
    """A process other than the main one: the stages up to the last training stage, for its share of the
    training; the main process runs the rest, writes the artifact and reports."""
    stages = recipe.resolved_stages()
    last = max((i for i, (stage, params) in enumerate(stages) if trains(stage, params)), default=-1)
    checkpoint = _load_source(recipe, device, SILENT) if last >= 0 else None
    names = []
    for stage, params in stages[: last + 1]:
        transformers.set_seed(recipe.seed)
        ctx = StageContext(device=device, seed=recipe.seed, data=recipe.data, use_cache=use_cache)
        checkpoint = stage.run(checkpoint, params, ctx)
        names.append(stage.name)
    return {"process": rank, "processes": launched_processes(), "stages_run": names}


def _load_source(recipe: Recipe, device, progress: Progress, blockwise: bool = False) -> Checkpoint:
    return load_checkpoint(
        recipe.model,
        dtype=recipe.dtype,
        device=str(device),
        trust_remote_code=recipe.trust_remote_code,
        allow_pickle=recipe.allow_pickle,
        blockwise=blockwise,
        progress=progress,
    )
