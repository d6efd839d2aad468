"""Commands for CI: ``streamify batch`` and ``streamify cache list|clean``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from streamify.cli.options import FormatOpt, NoCacheOpt, OverwriteOpt
from streamify.cli.output import Format, command

cache_app = typer.Typer(no_args_is_help=True, help="The stage cache: list entries, clean them.")


def batch(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or shipped recipe name; merge: join shard reports")],
    extra: Annotated[
        list[str] | None,
        typer.Argument(
            help="key=value / ~key overrides for every model; other words are more models", show_default=False
        ),
    ] = None,
    models: Annotated[list[str] | None, typer.Option("--models", help="a model (repeat the option for more)")] = None,
    models_file: Annotated[
        Path | None, typer.Option("--models-file", help="a text file, one model a line (# comments)")
    ] = None,
    out_root: Annotated[Path, typer.Option("--out-root", help="one artifact folder per model goes here")] = Path(
        "artifacts"
    ),
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="models run at the same time")] = 1,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="I/N: run only the I-th of N slices of the model list (one per machine)"),
    ] = None,
    overwrite: OverwriteOpt = False,
    no_cache: NoCacheOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Apply RECIPE to many models, continue past failures, write OUT_ROOT/batch.json; exit non-zero if any failed.

    Models: --models M1 M2 ... (or --models M1 --models M2) and/or --models-file F.
    Across machines: each runs `batch RECIPE ... --shard I/N` (writing
    OUT_ROOT/batch-shard-I-of-N.json); `batch merge DIR...` then joins the shard
    reports into OUT_ROOT/batch.json, with the exit code one batch would give.
    """
    from streamify.pipeline.batch import merge_reports, parse_shard, read_models_file, run_batch

    if recipe == "merge":
        with command(fmt) as out:
            report = merge_reports([Path(word) for word in extra or []], out_root)
            out.result(report, render_batch)
        if report["exit_code"]:
            raise typer.Exit(report["exit_code"])
        return
    overrides = [w for w in extra or [] if "=" in w or w.startswith("~")]
    with command(fmt) as out:
        slice_ = parse_shard(shard) if shard else None
        names = list(models or []) + [w for w in extra or [] if w not in overrides]
        names += read_models_file(models_file) if models_file else []
        report = run_batch(
            recipe,
            names,
            out_root,
            overrides=overrides,
            jobs=jobs,
            overwrite=overwrite,
            use_cache=not no_cache,
            shard=slice_,
            progress=out,
        )
        out.result(report, render_batch)
    if report["exit_code"]:
        raise typer.Exit(report["exit_code"])


def render_batch(console: Console, data: dict) -> None:
    """One row per model: status, exit code, perplexity, gates, artifact or error."""
    part = f" (shard {data['shard']['index']}/{data['shard']['count']})" if "shard" in data else ""
    table = Table(title=f"batch {data['recipe']}{part}: {data['ok']} ok, {data['failed']} failed")
    for column in ("model", "status", "exit", "perplexity", "gates", "artifact / error"):
        table.add_column(column)
    for row in data["models"]:
        gates = row.get("gates") or []
        passed = sum(g["passed"] for g in gates)
        perplexity = (row.get("eval") or {}).get("perplexity")
        table.add_row(
            row["model"],
            row["status"],
            str(row["exit_code"]),
            f"{perplexity:.3f}" if perplexity else "-",
            f"{passed}/{len(gates)}" if gates else "-",
            row["output"] if row["status"] == "ok" else row.get("error", ""),
        )
    console.print(table)
    from streamify.pipeline.batch import report_name

    shard = (data["shard"]["index"], data["shard"]["count"]) if "shard" in data else None
    console.print(f"report: {Path(data['out_root']) / report_name(shard)}")


@cache_app.command("list")
def cache_list(fmt: FormatOpt = Format.human) -> None:
    """Stage outputs, training checkpoints and dequantized GGUF files in the cache, with their sizes."""
    from streamify.io.cache import cache_root
    from streamify.pipeline.cache import cache_entries

    with command(fmt) as out:
        entries = cache_entries()
        data = {"root": str(cache_root()), "entries": entries, "bytes": sum(e["bytes"] for e in entries)}
        out.result(data, _render_cache)


def _render_cache(console: Console, data: dict) -> None:
    table = Table(title=f"{data['root']}: {data['bytes'] / 2**20:.1f} MiB")
    for column in ("kind", "key", "MiB", "last used", "made by"):
        table.add_column(column)
    for e in data["entries"]:
        made = f"{e['model']}: {' -> '.join(e['stages'])}" if e.get("stages") else ""
        table.add_row(e["kind"], e["key"][:16], f"{e['bytes'] / 2**20:.1f}", e["last_used"], made)
    console.print(table)


@cache_app.command("clean")
def cache_clean(
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="only entries unused for this many days")
    ] = None,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", help="stages, train, calibrate or gguf (repeatable; default all)")
    ] = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """Remove cache entries (all, or those unused for --older-than days)."""
    from streamify.errors import UsageError
    from streamify.pipeline.cache import KINDS, clean_cache

    with command(fmt) as out:
        unknown = sorted(set(kind or []) - set(KINDS))
        if unknown:
            raise UsageError(f"--kind {', '.join(unknown)}: unknown cache kind", f"kinds: {', '.join(KINDS)}")
        result = clean_cache(older_than_days=older_than, kinds=tuple(kind or KINDS))
        out.result(
            result,
            lambda console, d: console.print(
                f"removed {d['removed']} entries, freed {d['freed_bytes'] / 2**20:.1f} MiB in {d['root']}"
            ),
        )
