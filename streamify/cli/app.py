"""The ``streamify`` command: Typer apps, thin. Each builds a recipe or calls a library function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from streamify import __version__
from streamify.cli.options import (
    DataOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    EvalOpt,
    FormatOpt,
    LazyOpt,
    MaxTokensOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    SaveRecipeOpt,
    SeedOpt,
    SeqLenOpt,
    TrustOpt,
)
from streamify.cli.output import Format, command
from streamify.cli.render import render_eval, render_inspect, render_run

app = typer.Typer(
    name="streamify",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn offline model checkpoints into streaming, compressed, deployable ones.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="List, show, validate shipped and local recipes.")
convert_app = typer.Typer(no_args_is_help=True, help="Conversions: dtype (streaming and causal follow).")
quantize_app = typer.Typer(no_args_is_help=True, help="Compression: lossless entropy coding and its decoder.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(convert_app, name="convert")
app.add_typer(quantize_app, name="quantize")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"streamify {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """streamify: turn offline model checkpoints into streaming, compressed, deployable ones."""


@app.command()
def inspect(model: ModelArg, fmt: FormatOpt = Format.human, trust_remote_code: TrustOpt = False) -> None:
    """What MODEL is (architecture, blocks, attention layout, dtypes, size) and which stages apply."""
    from streamify.model.describe import describe

    with command(fmt) as out:
        out.result(describe(model, trust_remote_code), render_inspect)


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or shipped recipe name")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value dot-path overrides, ~key deletes", show_default=False),
    ] = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Run a recipe: load, run its stages, write the artifact, evaluate, check gates."""
    from streamify.pipeline.recipe import load_recipe
    from streamify.pipeline.runner import run_recipe

    with command(fmt) as out:
        loaded = load_recipe(recipe, overrides)
        out.result(run_recipe(loaded.recipe, overwrite=overwrite, dry_run=dry_run, progress=out), render_run)


@app.command("eval")
def eval_(
    model: ModelArg,
    vs: Annotated[str | None, typer.Option("--vs", help="a second model, evaluated on the same tokens")] = None,
    data: DataOpt = "builtin:pydoc",
    max_tokens: MaxTokensOpt = 16384,
    seq_len: SeqLenOpt = 512,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    lazy: LazyOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Perplexity on held-out text, parameters, size, bits per weight, load time and peak memory."""
    from streamify.eval.compare import evaluate_models
    from streamify.eval.report import EvalSpec

    with command(fmt) as out:
        spec = EvalSpec(data=data, max_tokens=max_tokens, seq_len=seq_len)
        options = {
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
            "lazy": lazy,
        }
        out.result(evaluate_models(model, vs, spec, options, progress=out), render_eval)


@recipe_app.command("list")
def recipe_list(fmt: FormatOpt = Format.human) -> None:
    """The recipes shipped with streamify."""
    from streamify.pipeline.recipe import shipped_recipes

    with command(fmt) as out:
        recipes = {name: _first_comment(path) for name, path in shipped_recipes().items()}
        out.result(
            {"recipes": recipes},
            lambda console, data: [console.print(f"{k:<20} {v}") for k, v in data["recipes"].items()],
        )


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@recipe_app.command("show")
def recipe_show(
    name: Annotated[str, typer.Argument(help="shipped recipe name or file")], fmt: FormatOpt = Format.human
) -> None:
    """Print a recipe's YAML."""
    from streamify.pipeline.recipe import find_recipe

    with command(fmt) as out:
        path = find_recipe(name)
        text = path.read_text()
        out.result(
            {"name": name, "path": str(path), "yaml": text},
            lambda console, data: console.print(data["yaml"], markup=False, end="", soft_wrap=True),
        )


@recipe_app.command("validate")
def recipe_validate(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or shipped recipe name")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides", show_default=False)] = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """Check a recipe (schema, stage names, every param) without loading any weights."""
    from streamify.pipeline.recipe import load_recipe

    with command(fmt) as out:
        loaded = load_recipe(recipe, overrides)
        stages = [s.name for s, _ in loaded.recipe.resolved_stages()]
        out.result(
            {"ok": True, "recipe": loaded.where, "stages": stages},
            lambda console, data: console.print(
                f"{data['recipe']}: valid ({len(stages)} stages: {', '.join(stages) or 'none'})"
            ),
        )


@recipe_app.command("schema")
def recipe_schema(fmt: FormatOpt = Format.json) -> None:
    """JSON schema of the recipe and of every stage's params."""
    from streamify.pipeline.recipe import Recipe
    from streamify.pipeline.registry import all_stages

    with command(fmt) as out:
        schema = {
            "recipe": Recipe.model_json_schema(),
            "stages": {name: s.params.model_json_schema() for name, s in all_stages().items()},
        }
        out.result(schema, lambda console, data: console.print_json(json.dumps(data)))


@convert_app.command("dtype")
def convert_dtype(
    model: ModelArg,
    output: OutOpt,
    dtype: Annotated[str, typer.Option("--dtype", help="target dtype: fp32, bf16 or fp16")] = "bf16",
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    evaluate: EvalOpt = True,
    overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False,
    save_recipe: SaveRecipeOpt = None,
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Cast MODEL's floating-point weights to fp32, bf16 or fp16 and write an artifact."""
    run_one_stage(
        "convert.dtype",
        {"dtype": dtype},
        {
            "model": model,
            "output": str(output),
            "device": device,
            "seed": seed,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
        },
        evaluate=evaluate,
        overwrite=overwrite,
        dry_run=dry_run,
        save_recipe=save_recipe,
        fmt=fmt,
    )


@quantize_app.command("entropy")
def quantize_entropy(
    model: ModelArg,
    output: OutOpt,
    level: Annotated[int, typer.Option("--level", help="pcodec level 0-12: higher is smaller, slower to encode")] = 8,
    chunk_elems: Annotated[int, typer.Option("--chunk-elems", help="elements per independent chunk")] = 1 << 18,
    threads: Annotated[int, typer.Option("--threads", help="encoding threads (0: all cores)")] = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    evaluate: EvalOpt = True,
    overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False,
    save_recipe: SaveRecipeOpt = None,
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Entropy-code MODEL's weights losslessly (BF16 to about 66%); decode with `streamify quantize decode`."""
    run_one_stage(
        "quantize.entropy",
        {"level": level, "chunk_elems": chunk_elems, "threads": threads},
        {
            "model": model,
            "output": str(output),
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
        },
        evaluate=evaluate,
        overwrite=overwrite,
        dry_run=dry_run,
        save_recipe=save_recipe,
        fmt=fmt,
    )


@quantize_app.command("decode")
def quantize_decode(
    artifact: Annotated[str, typer.Argument(help="a folder written by streamify quantize entropy")],
    output: OutOpt,
    threads: Annotated[int, typer.Option("--threads", help="decoding threads (0: all cores)")] = 0,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Restore a plain safetensors checkpoint, bit-identical to the one that was coded."""
    from streamify.quantize.entropy_restore import decode_artifact

    with command(fmt) as out:
        result = decode_artifact(artifact, str(output), overwrite=overwrite, threads=threads, progress=out)
        out.result(
            result,
            lambda console, data: console.print(
                f"decoded {data['decoded_bytes']:,} bytes in {data['seconds']:.2f} s -> {data['output']}"
            ),
        )


def run_one_stage(
    stage: str,
    params: dict,
    top: dict,
    *,
    evaluate: bool,
    overwrite: bool,
    dry_run: bool,
    save_recipe: Path | None,
    fmt: Format,
) -> None:
    """What every stage subcommand does: build a one-stage recipe, optionally save it, run it."""
    from streamify.pipeline.recipe import validate_recipe
    from streamify.pipeline.runner import run_recipe

    with command(fmt) as out:
        data = {**top, "stages": [{stage: params}], "eval": {} if evaluate else None}
        recipe = validate_recipe(data, f"streamify {stage.replace('.', ' ')}")
        if save_recipe is not None:
            save_recipe.write_text(recipe.to_yaml())
            out.log(f"wrote the equivalent recipe to {save_recipe}")
        out.result(run_recipe(recipe, overwrite=overwrite, dry_run=dry_run, progress=out), render_run)


def main() -> None:
    """Console-script entry point."""
    app()
