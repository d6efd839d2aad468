"""Options shared by every command, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from streamify.cli.output import Format

FormatOpt = Annotated[Format, typer.Option("--format", help="human, json (summary on stdout) or quiet")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="dtype to load in: auto, fp32, bf16, fp16")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps or auto")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="a .txt/.jsonl/.parquet file or folder, hf:NAME[:CONFIG[:SPLIT]], or builtin:pydoc"),
]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="artifact folder to write")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output folder")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the plan; read no weights, write nothing")]
SaveRecipeOpt = Annotated[Path | None, typer.Option("--save-recipe", help="write the equivalent recipe YAML here")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="run Python code shipped with the model")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="allow loading pickled .bin weights (can run code)")]
EvalOpt = Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate the artifact after writing it")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="tokens to score")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="window length in tokens")]
ModelArg = Annotated[str, typer.Argument(help="a model folder, .gguf file, builtin:ALIAS or hub id", metavar="MODEL")]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="first check a streamify artifact's files against its manifest's sha256")
]
LazyOpt = Annotated[
    bool, typer.Option("--lazy", help="run block by block: read (or decode) each block's weights as it runs, then drop")
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="neither reuse nor store stage outputs and training checkpoints")
]
KvBitsOpt = Annotated[
    int | None, typer.Option("--kv-bits", help="4: keep the recent keys/values in INT4 (sinks stay full precision)")
]
