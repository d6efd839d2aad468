"""The runner: validate, plan, load, run stages, write the artifact once, evaluate, check gates."""

from __future__ import annotations

import time

import transformers

from streamify.eval.report import eval_blocks, evaluate
from streamify.io.artifact import check_output, save_model_files, staged_folder, weights_size, write_manifest
from streamify.io.load import load_checkpoint
from streamify.io.manifest import build_manifest
from streamify.io.model_card import render_model_card
from streamify.io.placement import resolve_device
from streamify.io.source import resolve_source
from streamify.pipeline.gates import check_gates, raise_on_failure
from streamify.pipeline.plan import build_plan, check_fits
from streamify.pipeline.recipe import Recipe
from streamify.pipeline.registry import StageContext
from streamify.progress import SILENT, Progress


def run_recipe(recipe: Recipe, *, overwrite: bool = False, dry_run: bool = False, progress: Progress = SILENT) -> dict:
    """Run ``recipe`` end to end and return the run summary (the CLI's JSON output).

    With ``dry_run`` only the plan is made: no weights are read, nothing is written.
    Raises :class:`~streamify.errors.GateError` (exit 5) after writing the
    artifact when a gate fails.
    """
    stages = recipe.resolved_stages()
    source = resolve_source(recipe.model)
    out = check_output(recipe.output, source.folder, overwrite)
    device = resolve_device(recipe.device)
    plan = build_plan(recipe, source, out)
    if dry_run:
        return {"dry_run": True, "plan": plan}
    check_fits(plan, out)

    started = time.perf_counter()
    transformers.set_seed(recipe.seed)
    progress.log(f"loading {recipe.model}")
    checkpoint = load_checkpoint(
        recipe.model,
        dtype=recipe.dtype,
        device=recipe.device,
        trust_remote_code=recipe.trust_remote_code,
        allow_pickle=recipe.allow_pickle,
        progress=progress,
    )
    load_seconds = time.perf_counter() - started
    blocks, source_eval = None, None
    if recipe.needs_source_eval():
        blocks = eval_blocks(checkpoint.tokenizer, recipe.eval)
        progress.log("evaluating the source")
        source_eval = evaluate(
            checkpoint,
            recipe.eval,
            size_bytes=checkpoint.source.size_bytes(),
            load_seconds=load_seconds,
            blocks=blocks,
            progress=progress,
        )

    records = []
    for index, (stage, params) in enumerate(stages):
        progress.log(f"stage {index + 1}/{len(stages)}: {stage.name}")
        ctx = StageContext(device=device, seed=recipe.seed, data=recipe.data, progress=progress)
        stage_start = time.perf_counter()
        checkpoint = stage.run(checkpoint, params, ctx)
        records.append(
            {
                "name": stage.name,
                "params": params.model_dump(mode="json"),
                "seconds": round(time.perf_counter() - stage_start, 3),
                "metrics": ctx.metrics,
            }
        )

    with staged_folder(out) as tmp:
        progress.log(f"writing {out}")
        save_model_files(checkpoint, tmp)
        report = None
        if recipe.eval is not None:
            progress.log("evaluating the artifact")
            report = evaluate(checkpoint, recipe.eval, size_bytes=weights_size(tmp), blocks=blocks, progress=progress)
        gates = check_gates(recipe.gates, report, source_eval)
        manifest = build_manifest(
            checkpoint,
            stages=records,
            seed=recipe.seed,
            eval_report=report,
            source_eval=source_eval,
            gates=gates,
        )
        write_manifest(tmp, manifest)
        (tmp / "recipe.yaml").write_text(recipe.model_copy(update={"output": str(out)}).to_yaml())
        relation = next((s.relation for s, _ in reversed(stages) if s.relation), None)
        (tmp / "README.md").write_text(render_model_card(manifest, relation))
    raise_on_failure(gates, str(out))
    return {
        "output": str(out),
        "stages": records,
        "eval": report,
        "eval_source": source_eval,
        "gates": gates,
        "seconds": round(time.perf_counter() - started, 3),
    }
