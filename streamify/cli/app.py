"""The ``streamify`` command: Typer apps, thin. Each builds a recipe or calls a library function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from streamify import __version__
from streamify.cli.options import (
    AUTOCAST_HELP,
    DataOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    EvalOpt,
    FormatOpt,
    KvBitsOpt,
    LazyOpt,
    MaxTokensOpt,
    ModelArg,
    NoCacheOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    SaveRecipeOpt,
    SeedOpt,
    SeqLenOpt,
    TrustOpt,
    VerifyOpt,
)
from streamify.cli.output import Format, command
from streamify.cli.pipeline_commands import batch, cache_app
from streamify.cli.render import render_eval, render_inspect, render_run

app = typer.Typer(
    name="streamify",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn offline model checkpoints into streaming, compressed, deployable ones.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="List, show, validate shipped and local recipes.")
convert_app = typer.Typer(no_args_is_help=True, help="Conversions: dtype, streaming (sinks + window attention).")
prune_app = typer.Typer(no_args_is_help=True, help="Depth pruning: score blocks, remove them, heal.")
distill_app = typer.Typer(no_args_is_help=True, help="Distillation: heal a modified model towards its teacher.")
quantize_app = typer.Typer(
    no_args_is_help=True, help="Compression: INT4 weights, lossless entropy coding and its decoder."
)
app.add_typer(recipe_app, name="recipe")
app.add_typer(convert_app, name="convert")
app.add_typer(quantize_app, name="quantize")
app.add_typer(distill_app, name="distill")
app.add_typer(prune_app, name="prune")
app.add_typer(cache_app, name="cache")
app.command()(batch)


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
def verify(
    artifact: Annotated[str, typer.Argument(help="a folder written by streamify", metavar="ARTIFACT")],
    fmt: FormatOpt = Format.human,
) -> None:
    """Check every file of ARTIFACT against the sha256 its manifest recorded (exit 3 naming a file that differs)."""
    from streamify.io.verify import verify_artifact

    with command(fmt) as out:
        out.result(
            verify_artifact(Path(artifact).expanduser()),
            lambda console, data: console.print(
                f"{data['artifact']}: {data['files']} files ({data['bytes']:,} bytes) match the manifest"
            ),
        )


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or shipped recipe name")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value dot-path overrides, ~key deletes", show_default=False),
    ] = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    no_cache: NoCacheOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Run a recipe: load, run its stages (reusing cached ones), write the artifact, evaluate, check gates."""
    from streamify.pipeline.recipe import load_recipe
    from streamify.pipeline.runner import run_recipe

    with command(fmt) as out:
        loaded = load_recipe(recipe, overrides)
        result = run_recipe(loaded.recipe, overwrite=overwrite, dry_run=dry_run, use_cache=not no_cache, progress=out)
        out.result(result, render_run)


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
    verify: VerifyOpt = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="run the streaming runtime over --tokens held-out tokens")
    ] = False,
    tokens: Annotated[
        int | None, typer.Option("--tokens", help="stream length (--stream: 8192; equivalence: 3×(sinks+window))")
    ] = None,
    chunk: Annotated[int, typer.Option("--chunk", help="--stream: tokens fed per step (1: per-token decode)")] = 16,
    check: Annotated[
        str | None, typer.Option("--check", help="equivalence: chunked cached runtime vs masked full forward")
    ] = None,
    chunks: Annotated[str, typer.Option("--chunks", help="--check equivalence: chunk sizes to compare")] = "1,7,64",
    kv_bits: KvBitsOpt = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """Perplexity on held-out text, parameters, size, bits per weight, load time and peak memory.

    With --stream, the streaming runtime's perplexity, cache bytes and latency
    over a long stream; with --check equivalence, the runtime against one
    forward under the explicit sink + window mask.
    """
    from streamify.eval.compare import evaluate_models
    from streamify.eval.report import EvalSpec

    if stream or check:
        _eval_streaming(model, data, stream, tokens, chunk, check, chunks, dtype, device, kv_bits, fmt)
        return
    with command(fmt) as out:
        spec = EvalSpec(data=data, max_tokens=max_tokens, seq_len=seq_len)
        options = {
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
            "lazy": lazy,
            "verify": verify,
        }
        out.result(evaluate_models(model, vs, spec, options, progress=out), render_eval)


def _eval_streaming(model, data, stream, tokens, chunk, check, chunks, dtype, device, kv_bits, fmt) -> None:
    from streamify.cli.render import render_streaming_eval
    from streamify.errors import UsageError
    from streamify.eval.streaming import check_equivalence, stream_eval
    from streamify.io.load import load_checkpoint

    with command(fmt) as out:
        if check not in (None, "equivalence"):
            raise UsageError(f"--check {check}: unknown check", "the one check is: --check equivalence")
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, progress=out)
        result: dict = {"model_spec": model}
        if stream:
            result["stream"] = stream_eval(checkpoint, data, tokens or 8192, chunk, progress=out, kv_bits=kv_bits)
        if check:
            sizes = [int(c) for c in chunks.split(",")]
            result["equivalence"] = check_equivalence(checkpoint, data, tokens, sizes, progress=out)
        out.result(result, render_streaming_eval)


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; above 0: sampling")] = 0.0,
    kv_bits: KvBitsOpt = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    fmt: FormatOpt = Format.human,
) -> None:
    """Generate with the streaming runtime (bounded cache) from a streaming artifact."""
    from streamify.errors import UsageError
    from streamify.io.load import load_checkpoint
    from streamify.runtime.generate import generate_text

    with command(fmt) as out:
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, progress=out)
        if getattr(checkpoint.model, "streamify_controller", None) is None:
            raise UsageError(f"{model} is not a streaming model", "convert it first: streamify convert streaming")
        text, count, cache_bytes = generate_text(
            checkpoint.model,
            checkpoint.tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            seed=seed,
            kv_bits=kv_bits,
        )
        out.result(
            {"prompt": prompt, "text": text, "new_tokens": count, "cache_bytes": cache_bytes},
            lambda console, data: console.print(data["prompt"] + data["text"], markup=False, highlight=False),
        )


@app.command()
def stream(
    model: ModelArg,
    input_path: Annotated[str, typer.Option("--input", help="text file to stream, or - for stdin (may be endless)")],
    chunk: Annotated[int, typer.Option("--chunk", help="tokens fed per step")] = 64,
    report_every: Annotated[int, typer.Option("--report-every", help="log one line every N chunks")] = 16,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    fmt: FormatOpt = Format.human,
) -> None:
    """Feed a text stream chunk by chunk; report per-chunk loss, latency and cache bytes."""
    from streamify.cli.render import render_stream
    from streamify.io.load import load_checkpoint
    from streamify.runtime.stream import open_text, stream_text

    with command(fmt) as out:
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, progress=out)
        with open_text(input_path) as lines:
            result = stream_text(checkpoint.model, checkpoint.tokenizer, lines, chunk, report_every, out, kv_bits)
        out.result(result, render_stream)


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


@quantize_app.command("int4")
def quantize_int4(
    model: ModelArg,
    output: OutOpt,
    method: Annotated[
        str, typer.Option("--method", help="rtn, gptq or awq (awq: the architectures streamify.arch maps)")
    ] = "gptq",
    group_size: Annotated[
        str, typer.Option("--group-size", help="weights per scale (32, 64, 128, ...) or auto")
    ] = "128",
    symmetric: Annotated[bool, typer.Option("--sym/--asym", help="symmetric or asymmetric groups")] = True,
    targets: Annotated[
        list[str] | None, typer.Option("--targets", help="module pattern to quantize (repeatable)")
    ] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="module pattern to skip (repeatable)")] = None,
    samples: Annotated[int, typer.Option("--samples", help="gptq/awq: calibration sequences")] = 64,
    seq_len: SeqLenOpt = 512,
    act_order: Annotated[
        bool, typer.Option("--act-order/--no-act-order", help="gptq: columns by decreasing Hessian diagonal")
    ] = True,
    calibration_dtype: Annotated[
        str, typer.Option("--calibration-dtype", help="auto (the model's) or bf16 (autocast, faster on AMX CPUs)")
    ] = "auto",
    weight_format: Annotated[
        str, typer.Option("--weights-format", help="compressed-tensors or gguf (--format is the output format)")
    ] = "compressed-tensors",
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="gguf: Q4_0 (sym) or Q4_1 (asym)")] = "Q4_0",
    entropy: Annotated[
        bool, typer.Option("--entropy", help="compressed-tensors: entropy-code the 4-bit codes too (lossless)")
    ] = False,
    data: DataOpt = "builtin:pydoc",
    dtype: DtypeOpt = "auto",
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
    """Weight-only INT4 (W4A16) by RTN or GPTQ; writes compressed-tensors (vLLM, transformers) or GGUF (llama.cpp)."""
    params = {
        "method": method,
        "group_size": int(group_size) if group_size.isdigit() else group_size,
        "symmetric": symmetric,
        "targets": targets or None,
        "ignore": ignore or [],
        "samples": samples,
        "seq_len": seq_len,
        "act_order": act_order,
        "calibration_dtype": calibration_dtype,
        "format": weight_format,
        "gguf_type": gguf_type,
        "entropy": entropy,
    }
    run_one_stage(
        "quantize.int4",
        params,
        _top(model, output, data, dtype, device, seed, trust_remote_code, allow_pickle),
        evaluate=evaluate,
        overwrite=overwrite,
        dry_run=dry_run,
        save_recipe=save_recipe,
        fmt=fmt,
    )


@convert_app.command("streaming")
def convert_streaming(
    model: ModelArg,
    output: OutOpt,
    sinks: Annotated[int, typer.Option("--sinks", help="attention-sink tokens kept from the stream's start")] = 4,
    window: Annotated[
        int, typer.Option("--window", help="recent tokens each token attends to (itself included)")
    ] = 1024,
    full_layers: Annotated[
        str, typer.Option("--full-layers", help="full-attention layers: none, every:K, middle-third or 3,7,...")
    ] = "none",
    export_arch: Annotated[
        str, typer.Option("--export-arch", help="same, or native (a transformers sliding-window architecture)")
    ] = "same",
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="LoRA healing steps against the original")] = 0,
    heal_lr: Annotated[float, typer.Option("--heal-lr", help="healing peak learning rate")] = 2e-4,
    heal_seq_len: Annotated[
        int | None, typer.Option("--heal-seq-len", help="healing sequence length (default 2×(sinks+window))")
    ] = None,
    heal_grad_accum: Annotated[int, typer.Option("--heal-grad-accum", help="micro-batches per step")] = 4,
    heal_lora_rank: Annotated[int, typer.Option("--heal-lora-rank", help="LoRA rank (0: all weights)")] = 16,
    heal_ce_weight: Annotated[float, typer.Option("--heal-ce-weight", help="weight of next-token CE")] = 0.0,
    heal_autocast: Annotated[str, typer.Option("--heal-autocast", help=AUTOCAST_HELP)] = "off",
    data: DataOpt = "builtin:pydoc",
    dtype: DtypeOpt = "auto",
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
    """Make MODEL stream: attention sinks + sliding window (StreamingLLM), optional full layers and healing."""
    heal = _heal_params(
        heal_steps, heal_lr, heal_seq_len, heal_grad_accum, heal_lora_rank, heal_ce_weight, heal_autocast
    )
    run_one_stage(
        "convert.streaming",
        {"sinks": sinks, "window": window, "full_layers": full_layers, "export_arch": export_arch, "heal": heal},
        _top(model, output, data, dtype, device, seed, trust_remote_code, allow_pickle),
        evaluate=evaluate,
        overwrite=overwrite,
        dry_run=dry_run,
        save_recipe=save_recipe,
        fmt=fmt,
    )


@prune_app.command("depth")
def prune_depth(
    model: ModelArg,
    output: OutOpt,
    remove: Annotated[int | None, typer.Option("--remove", help="number of blocks to remove")] = None,
    keep_ratio: Annotated[float | None, typer.Option("--keep-ratio", help="fraction of blocks to keep")] = None,
    blocks: Annotated[str | None, typer.Option("--blocks", help="exact block ids to remove, e.g. 12,13,14")] = None,
    metric: Annotated[str, typer.Option("--metric", help="bi, angular, streamline or loss")] = "angular",
    reinit: Annotated[str, typer.Option("--reinit", help="none, or average (neighbours absorb removed)")] = "none",
    replace: Annotated[bool, typer.Option("--replace", help="replace the span with one trained block")] = False,
    replace_steps: Annotated[int, typer.Option("--replace-steps", help="training steps of the replacement")] = 100,
    samples: Annotated[int, typer.Option("--samples", help="calibration sequences")] = 8,
    seq_len: SeqLenOpt = 512,
    protect_ends: Annotated[
        bool, typer.Option("--protect-ends/--no-protect-ends", help="never remove the first or last block")
    ] = True,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="healing steps against the unpruned model")] = 0,
    heal_lr: Annotated[float, typer.Option("--heal-lr", help="healing peak learning rate")] = 2e-4,
    heal_seq_len: Annotated[int | None, typer.Option("--heal-seq-len", help="healing sequence length")] = None,
    heal_grad_accum: Annotated[int, typer.Option("--heal-grad-accum", help="micro-batches per step")] = 4,
    heal_lora_rank: Annotated[int, typer.Option("--heal-lora-rank", help="LoRA rank (0: all weights)")] = 16,
    heal_ce_weight: Annotated[float, typer.Option("--heal-ce-weight", help="weight of next-token CE")] = 0.0,
    heal_autocast: Annotated[str, typer.Option("--heal-autocast", help=AUTOCAST_HELP)] = "off",
    heal_hidden_weight: Annotated[
        float, typer.Option("--heal-hidden-weight", help="weight of per-block hidden-state MSE (layer-wise)")
    ] = 0.0,
    data: DataOpt = "builtin:pydoc",
    dtype: DtypeOpt = "auto",
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
    """Remove whole blocks of MODEL (scored by a metric or given), optionally re-initialise, replace and heal."""
    params = {
        "remove": remove,
        "keep_ratio": keep_ratio,
        "blocks": blocks,
        "metric": metric,
        "reinit": reinit,
        "replace": replace,
        "replace_steps": replace_steps,
        "samples": samples,
        "seq_len": seq_len,
        "protect_ends": protect_ends,
        "heal": {
            **_heal_params(
                heal_steps, heal_lr, heal_seq_len, heal_grad_accum, heal_lora_rank, heal_ce_weight, heal_autocast
            ),
            "hidden_weight": heal_hidden_weight,
        },
    }
    run_one_stage(
        "prune.depth",
        params,
        _top(model, output, data, dtype, device, seed, trust_remote_code, allow_pickle),
        evaluate=evaluate,
        overwrite=overwrite,
        dry_run=dry_run,
        save_recipe=save_recipe,
        fmt=fmt,
    )


def _heal_params(steps, lr, seq_len, grad_accum, lora_rank, ce_weight, autocast) -> dict:
    """The ``heal`` params of a stage from its --heal-* options."""
    return {
        "steps": steps,
        "lr": lr,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "lora_rank": lora_rank,
        "ce_weight": ce_weight,
        "autocast": autocast,
    }


@distill_app.command("heal")
def distill_heal(
    model: ModelArg,
    output: OutOpt,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="teacher MODEL (default: a streaming input's full-attention self)"),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="optimizer steps")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate")] = 2e-4,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="training sequence length")] = None,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="micro-batches per step")] = 4,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank (0: all weights)")] = 16,
    ce_weight: Annotated[float, typer.Option("--ce-weight", help="weight of next-token CE")] = 0.0,
    autocast: Annotated[str, typer.Option("--autocast", help=AUTOCAST_HELP)] = "off",
    data: DataOpt = "builtin:pydoc",
    dtype: DtypeOpt = "auto",
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
    """Heal MODEL by distillation (KL on logits, LoRA merged) towards --teacher or its full-attention self."""
    params = {"teacher": teacher, **_heal_params(steps, lr, seq_len, grad_accum, lora_rank, ce_weight, autocast)}
    run_one_stage(
        "distill.heal",
        params,
        _top(model, output, data, dtype, device, seed, trust_remote_code, allow_pickle),
        evaluate=evaluate,
        overwrite=overwrite,
        dry_run=dry_run,
        save_recipe=save_recipe,
        fmt=fmt,
    )


def _top(model, output, data, dtype, device, seed, trust_remote_code, allow_pickle) -> dict:
    """The recipe's top-level keys from a stage subcommand's common options."""
    return {
        "model": model,
        "output": str(output),
        "data": data,
        "dtype": dtype,
        "device": device,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "allow_pickle": allow_pickle,
    }


@quantize_app.command("decode")
def quantize_decode(
    artifact: Annotated[str, typer.Argument(help="a folder written by streamify quantize entropy")],
    output: OutOpt,
    threads: Annotated[int, typer.Option("--threads", help="decoding threads (0: all cores)")] = 0,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Restore a plain safetensors checkpoint, bit-identical to the one that was coded."""
    from streamify.codec.restore import decode_artifact

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
        recipe = validate_recipe(data, f"streamify {stage.replace('.', ' ')}", flags=True)
        if save_recipe is not None:
            save_recipe.write_text(recipe.to_yaml())
            out.log(f"wrote the equivalent recipe to {save_recipe}")
        out.result(run_recipe(recipe, overwrite=overwrite, dry_run=dry_run, progress=out), render_run)


def main() -> None:
    """Console-script entry point."""
    app()
