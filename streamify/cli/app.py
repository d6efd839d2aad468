"""The ``streamify`` command: Typer apps, thin. Each builds a recipe or calls a library function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from streamify import __version__
from streamify.cli.options import (
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    FormatOpt,
    KvBitsOpt,
    LazyOpt,
    MaxTokensOpt,
    ModelArg,
    NoCacheOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    SeedOpt,
    SeqLenOpt,
    TrustOpt,
    VerifyOpt,
)
from streamify.cli.output import Format, command
from streamify.cli.pipeline_commands import batch, cache_app
from streamify.cli.render import render_eval, render_inspect, render_run
from streamify.cli.stage_commands import stage_group

app = typer.Typer(
    name="streamify",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn offline model checkpoints into streaming, compressed, deployable ones.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="List, show, validate shipped and local recipes.")
CommitOpt = Annotated[
    str,
    typer.Option(
        "--commit",
        help="speech streaming: when text becomes stable, agreement (two hypotheses agree) or probability "
        "(CarelessWhisper: the last 2 tokens re-scored each chunk)",
    ),
]
convert_app = stage_group("Conversions: dtype, streaming (sinks + window attention).")
prune_app = stage_group("Depth pruning: score blocks, remove them, heal.")
distill_app = stage_group("Distillation: heal a modified model towards its teacher.")
quantize_app = stage_group("Compression: INT4 weights, lossless entropy coding and its decoder.")
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
        out.run(
            lambda: run_recipe(
                loaded.recipe, overwrite=overwrite, dry_run=dry_run, use_cache=not no_cache, progress=out
            ),
            render_run,
        )


@app.command("eval")
def eval_(
    model: ModelArg,
    vs: Annotated[str | None, typer.Option("--vs", help="a second model, evaluated on the same inputs")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="text: a .txt/.jsonl/.parquet file or folder, hf:NAME[:CONFIG[:SPLIT]] or builtin:pydoc (default); "
            "speech: a folder of .wav/.flac clips with .txt transcripts; denoisers: builtin:random-latents (default) "
            "or builtin:shapes (RGB pixels)",
        ),
    ] = None,
    max_tokens: MaxTokensOpt = 16384,
    seq_len: SeqLenOpt = 512,
    max_items: Annotated[int, typer.Option("--max-items", help="speech clips or denoiser samples to score")] = 32,
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
        str | None,
        typer.Option("--check", help="equivalence: chunked cached runtime vs stock model under StreamingLLM's cache"),
    ] = None,
    chunks: Annotated[str, typer.Option("--chunks", help="--check equivalence: chunk sizes to compare")] = "1,7,64",
    kv_bits: KvBitsOpt = None,
    chunk_ms: Annotated[
        int | None,
        typer.Option("--chunk-ms", help="--stream of a speech model: audio per chunk (default: the model's, else 300)"),
    ] = None,
    commit: CommitOpt = "agreement",
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", help="lm-eval tasks to score too, comma-separated (needs streamify[tasks])"),
    ] = None,
    tasks_path: Annotated[
        str | None, typer.Option("--tasks-path", help="a folder of lm-eval task YAML files (local tasks)")
    ] = None,
    tasks_limit: Annotated[
        int | None, typer.Option("--tasks-limit", help="score only the first N documents of each task")
    ] = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """The model kind's quality (perplexity, WER, denoising loss...), parameters, size, load time and peak memory.

    With --stream, the streaming runtime's perplexity, cache bytes and latency
    over a long stream (a speech model: WER, latency per chunk, real-time factor
    and flicker of chunk-by-chunk transcription); with --check equivalence, the runtime against the stock
    transformers model decoding token by token over StreamingLLM's cache; with
    --tasks, lm-eval task scores (accuracy...) of the loaded model as well.
    """
    from streamify.eval.compare import evaluate_models
    from streamify.eval.report import EvalSpec

    if stream or check:
        _eval_streaming(
            model, data, stream, tokens, chunk, check, chunks, dtype, device, kv_bits, fmt, chunk_ms, max_items, commit
        )
        return
    with command(fmt) as out:
        task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        spec = EvalSpec(
            data=data,
            max_tokens=max_tokens,
            seq_len=seq_len,
            max_items=max_items,
            tasks=task_names,
            tasks_path=tasks_path,
            tasks_limit=tasks_limit,
        )
        options = {
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
            "lazy": lazy,
            "verify": verify,
        }
        out.result(evaluate_models(model, vs, spec, options, progress=out), render_eval)


def _eval_streaming(
    model, data, stream, tokens, chunk, check, chunks, dtype, device, kv_bits, fmt, chunk_ms, max_items, commit
) -> None:
    from streamify.cli.render import render_streaming_eval
    from streamify.data.speech import SPEECH
    from streamify.errors import UsageError
    from streamify.eval.speech_stream import speech_stream_eval
    from streamify.eval.streaming import check_equivalence, stream_eval
    from streamify.eval.video import check_video_equivalence
    from streamify.io.load import load_checkpoint
    from streamify.kinds import require_kind
    from streamify.kinds.causal_lm import CAUSAL_LM, DEFAULT_TEXT
    from streamify.kinds.speech import SpeechSeq2Seq
    from streamify.runtime.transcribe import check_commit

    with command(fmt) as out:
        if check not in (None, "equivalence"):
            raise UsageError(f"--check {check}: unknown check", "the one check is: --check equivalence")
        check_commit(commit)
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, progress=out)
        if check and getattr(checkpoint.model, "streamify_video", None) is not None:
            out.result(
                {"model_spec": model, "equivalence": check_video_equivalence(checkpoint.model)}, render_streaming_eval
            )
            return
        if stream and not check and checkpoint.kind.name == SpeechSeq2Seq.name:
            speech = speech_stream_eval(checkpoint, data or SPEECH, chunk_ms, max_items, commit, progress=out)
            out.result({"model_spec": model, "stream": speech}, render_streaming_eval)
            return
        require_kind(checkpoint, CAUSAL_LM, "the streaming runtime")
        data = data or DEFAULT_TEXT
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
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="text to continue; for a video model a builtin:shapes label")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; above 0: sampling")] = 0.0,
    kv_bits: KvBitsOpt = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    lazy: LazyOpt = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="video: the folder to write")] = None,
    condition: Annotated[
        Path | None, typer.Option("--condition", help="video: .safetensors with a 'condition' [tokens, text_dim]")
    ] = None,
    frames: Annotated[int, typer.Option("--frames", min=1, help="video: latent frames")] = 16,
    height: Annotated[int, typer.Option("--height", min=1, help="video: latent height")] = 16,
    width: Annotated[int, typer.Option("--width", min=1, help="video: latent width")] = 16,
    timesteps: Annotated[
        str | None,
        typer.Option("--timesteps", help="video, block-causal: the few-step schedule (default: the trained one)"),
    ] = None,
    sample_steps: Annotated[
        int, typer.Option("--sample-steps", min=1, help="video: Euler steps (a clip or chunk)")
    ] = 48,
    euler: Annotated[
        bool, typer.Option("--euler", help="video, block-causal: --sample-steps Euler steps a chunk, not --timesteps")
    ] = False,
    shift: Annotated[float, typer.Option("--shift", min=0.01, help="video, bidirectional: flow shift")] = 1.0,
    guidance: Annotated[
        float, typer.Option("--guidance", min=0.0, help="video: classifier-free guidance scale (1: none)")
    ] = 1.0,
    vae: Annotated[
        Path | None, typer.Option("--vae", help="video, latent model: the diffusers VAE folder that makes frames")
    ] = None,
    fps: Annotated[
        int, typer.Option("--fps", min=1, max=60, help="video: frames a second of video.gif and video.mp4")
    ] = 8,
    fmt: FormatOpt = Format.human,
) -> None:
    """Generate from a causal LM (plain, INT4, GGUF, coded; a streaming one streams) or a video denoiser.

    A streaming artifact generates with its bounded cache (sinks + window); any
    other with transformers' cache, which grows with the text. --lazy keeps one
    or two blocks' weights in memory (decoded ahead of the block that runs).
    A block-causal video denoiser generates chunk by chunk over its cache with
    --timesteps; a bidirectional one samples the whole clip with --sample-steps.
    """
    from streamify.errors import UsageError
    from streamify.io.load import load_checkpoint
    from streamify.kinds import require_kind
    from streamify.kinds.causal_lm import CAUSAL_LM
    from streamify.runtime.generate import generate_text

    with command(fmt) as out:
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, lazy=lazy, progress=out)
        if checkpoint.kind.name == "denoiser":
            from streamify.cli.video import run_video, video_request

            config = checkpoint.model.config
            request = video_request(
                config, frames, height, width, timesteps, sample_steps, shift, seed, euler, guidance
            )
            run_video(
                checkpoint,
                out,
                prompt=prompt,
                condition_file=condition,
                output=output,
                request=request,
                vae=vae,
                fps=fps,
            )
            return
        require_kind(checkpoint, CAUSAL_LM, "generation")
        if prompt is None:
            raise UsageError("generation needs a prompt", "pass --prompt TEXT")
        if checkpoint.tokenizer is None:
            raise UsageError(f"{model}: the checkpoint has no tokenizer", "use a checkpoint with tokenizer files")
        result = generate_text(
            checkpoint.model,
            checkpoint.tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            seed=seed,
            kv_bits=kv_bits,
        )
        out.log(f"runtime: {result['runtime']}")
        out.result(
            {"prompt": prompt, **result},
            lambda console, data: console.print(data["prompt"] + data["text"], markup=False, highlight=False),
        )


@app.command("encode-prompts")
def encode_prompts_command(
    prompts: Annotated[Path, typer.Argument(help="a text file, one prompt a line")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .safetensors file to write")],
    text_encoder: Annotated[
        Path, typer.Option("--text-encoder", help="a Wan Diffusers checkpoint folder (tokenizer/, text_encoder/)")
    ],
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="tokens a prompt is padded to")] = 512,
    negative: Annotated[
        str, typer.Option("--negative", help="the negative prompt, the unconditional branch of guidance")
    ] = "",
    device: DeviceOpt = "cpu",
    fmt: FormatOpt = Format.human,
) -> None:
    """Encode prompts into a video denoiser's conditions (Wan's UMT5 states, as WanPipeline makes them)."""
    from streamify.data.prompt_encoding import (
        encode_prompts,
        load_text_encoder,
        read_prompts,
        require_new_file,
        write_conditions,
    )
    from streamify.io.placement import resolve_device

    with command(fmt) as out:
        require_new_file(output)  # before the encoder is loaded; write_conditions checks again
        texts = read_prompts(prompts)
        pipeline = load_text_encoder(text_encoder, resolve_device(device))
        conditions = encode_prompts(pipeline, texts, max_length, progress=out)
        names = write_conditions(conditions, encode_prompts(pipeline, [negative], max_length)[0], output)
        result = {"prompts": len(texts), "shape": list(conditions.shape), "tensors": names, "output": str(output)}
        out.result(
            result,
            lambda console, data: console.print(
                f"{data['prompts']} prompts -> {', '.join(data['tensors'])} {data['shape']}: {data['output']}",
                markup=False,
                highlight=False,
            ),
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
    from streamify.kinds import require_kind
    from streamify.kinds.causal_lm import CAUSAL_LM
    from streamify.runtime.stream import open_text, stream_text

    with command(fmt) as out:
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, progress=out)
        require_kind(checkpoint, CAUSAL_LM, "the streaming runtime")
        with open_text(input_path) as lines:
            result = stream_text(checkpoint.model, checkpoint.tokenizer, lines, chunk, report_every, out, kv_bits)
        out.result(result, render_stream)


@app.command()
def transcribe(
    model: ModelArg,
    input_path: Annotated[
        str,
        typer.Argument(
            metavar="INPUT", help="a .wav/.flac file, or - for raw 16-bit mono PCM at 16 kHz on stdin (a live stream)"
        ),
    ],
    chunk_ms: Annotated[
        int | None,
        typer.Option("--chunk-ms", help="audio per chunk, a multiple of 20 ms (default: the model's, else 300)"),
    ] = None,
    first_chunk_extra_ms: Annotated[
        int | None,
        typer.Option(
            "--first-chunk-extra-ms", help="extra audio in the first chunk, 20 ms steps (default: the model's)"
        ),
    ] = None,
    commit: CommitOpt = "agreement",
    offline: Annotated[
        bool, typer.Option("--offline", help="also transcribe the whole clip at once, to compare")
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    fmt: FormatOpt = Format.human,
) -> None:
    """Transcribe speech chunk by chunk as it arrives: a chunk-causal encoder with a cache, re-decoding per chunk.

    Shows the stable text and, after a |, the tentative rest as each chunk is
    heard; reports per-chunk latency, real-time factor and flicker (the share of
    words that changed after they were first shown).
    """
    import sys

    from streamify.cli.render import render_transcription
    from streamify.data.audio import read_audio, stdin_pieces
    from streamify.eval.speech_stream import chunk_spec
    from streamify.io.load import load_checkpoint
    from streamify.kinds import require_kind
    from streamify.kinds.speech import SpeechSeq2Seq
    from streamify.runtime.speech_encoder import FRAME_MS, whisper_chunks
    from streamify.runtime.transcribe import (
        audio_pieces,
        check_commit,
        first_piece,
        transcribe_offline,
        transcribe_stream,
    )

    with command(fmt) as out:
        whisper_chunks(chunk_ms or 300, first_chunk_extra_ms or 0)  # a bad size fails before the model loads
        check_commit(commit)
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, progress=out)
        require_kind(checkpoint, SpeechSeq2Seq.name, "streaming transcription")
        spec = chunk_spec(checkpoint, chunk_ms, first_chunk_extra_ms)
        model_, processor, tokenizer = checkpoint.model, checkpoint.processor, checkpoint.tokenizer
        rate, lookahead = processor.sampling_rate, processor.n_fft // 2
        if input_path == "-":
            size = spec.chunk_frames * FRAME_MS * rate // 1000
            pieces = stdin_pieces(sys.stdin.buffer, size, first_piece(spec, rate, lookahead))
            audio = None
        else:
            audio, note = read_audio(input_path, rate)
            if note:
                out.log(note)
            pieces = audio_pieces(audio, spec, rate, lookahead)

        def show(step) -> None:
            out.log(f"[{step.heard_seconds:6.2f} s] {step.stable.strip()} | {step.tentative.strip()}")

        result = transcribe_stream(model_, processor, tokenizer, pieces, spec, on_step=show, commit=commit)
        if offline and audio is not None:
            result["offline_text"] = transcribe_offline(model_, processor, tokenizer, audio)
        out.result(result, render_transcription)


@recipe_app.command("list")
def recipe_list(fmt: FormatOpt = Format.human) -> None:
    """The recipes shipped with streamify."""
    from streamify.pipeline.recipe import shipped_recipes

    with command(fmt) as out:
        recipes = {name: _first_comment(path) for name, path in shipped_recipes().items()}
        out.result(
            {"recipes": recipes},
            lambda console, data: [console.print(f"{k:<20} {v}", soft_wrap=True) for k, v in data["recipes"].items()],
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


def main() -> None:
    """Console-script entry point."""
    if not sys.stdout.isatty():  # third-party tqdm bars (GGUF dequantization, ...) follow our own: none
        os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported, so set before any import
        os.environ.setdefault("COLUMNS", "120")  # not rich's 80 in a pipe: --help would cut long option names
    app()
