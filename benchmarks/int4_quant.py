"""INT4 weight quantization of SmolLM2-135M, side by side in one run.

Usage:  .venv/bin/python benchmarks/int4_quant.py [--group-size 64] [--samples 128] [--seq-len 512]
                                                  [--eval-tokens 8192] [--methods rtn gptq gptq-bf16 awq]
                                                  [--skip-llmcompressor] [--skip-gguf] [--json out.json]

Part 1, W4A16 with one group size (must divide 576): RTN, streamify's GPTQ, streamify's AWQ, and
llm-compressor's GPTQ (installed in its own virtual environment, benchmarks/.venv-llmcompressor,
created on first use: torch==2.13.0 first, then llmcompressor 0.14). Every method calibrates on the
same token blocks (builtin:pydoc train split, seed 0) and is scored on the same held-out blocks; each
artifact is reloaded from disk (compressed-tensors) and evaluated in this process.

Every row records the bytes of its weight files.

Part 2, GGUF Q4_0 in llama.cpp: streamify's Q4_0 (RTN and GPTQ, group 32), against llama.cpp's own
quantizer (``llama_model_quantize``, Q4_0) applied to streamify's F16 GGUF export of the same weights;
all three scored by llama.cpp on the same held-out tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.eval.perplexity import perplexity
from streamify.eval.report import EvalSpec, eval_data
from streamify.io.artifact import save_model_files, weights_size
from streamify.io.load import load_checkpoint
from streamify.pipeline.registry import StageContext, get_stage
from streamify.quantize.int4.gguf import write_gguf
from streamify.quantize.int4.stage import Int4Params

MODEL = "builtin:smollm2-135m"
HERE = Path(__file__).resolve().parent
LLMC_VENV = HERE / ".venv-llmcompressor"


def quantize(**params):
    """SmolLM2 after quantize.int4 (in memory) and the stage's wall time."""
    checkpoint = load_checkpoint(MODEL)
    ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:pydoc")
    started = time.perf_counter()
    checkpoint = get_stage("quantize.int4").run(checkpoint, Int4Params(**params), ctx)
    return checkpoint, time.perf_counter() - started


def reloaded_perplexity(checkpoint, blocks, folder: Path) -> float:
    """Save the artifact, load it back from disk as a user would, score it."""
    save_model_files(checkpoint, folder)
    model = load_checkpoint(str(folder)).model
    return perplexity(model, blocks, 1)["perplexity"]


def llmcompressor(model_dir: Path, calibration: torch.Tensor, out: Path, group_size: int) -> float:
    python = LLMC_VENV / "bin" / "python"
    if not python.exists():
        print("creating benchmarks/.venv-llmcompressor (torch CPU build first)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "llmcompressor==0.14.*"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump({"input_ids": calibration.tolist()}, handle)
        handle.flush()
        done = subprocess.run(
            [str(python), str(HERE / "llmcompressor_gptq.py"), str(model_dir), handle.name, str(out), str(group_size)],
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def llama_cpp_perplexity(path: Path, blocks: torch.Tensor) -> float:
    """Perplexity of a GGUF file in llama.cpp over ``blocks`` (one context per block)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=blocks.shape[1], logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for row in blocks:
        llm.reset()
        llm.eval(row.tolist())
        scores = torch.from_numpy(np.array(llm.scores[: row.numel()], dtype=np.float32))
        nll += torch.nn.functional.cross_entropy(scores[:-1], row[1:], reduction="sum").item()
        count += row.numel() - 1
    return math.exp(nll / count)


def llama_cpp_quantize(source: Path, target: Path) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    started = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")
    return time.perf_counter() - started


def part_one(args, base, blocks, work: Path) -> list[dict]:
    teacher = perplexity(base.model, blocks, 1)["perplexity"]
    rows = [{"method": "fp32 (SmolLM2 GGUF Q4_1, dequantized)", "perplexity": teacher, "seconds": None}]
    for name in args.methods:
        method, _, calibration = name.partition("-")
        checkpoint, seconds = quantize(
            method=method,
            group_size=args.group_size,
            samples=args.samples,
            seq_len=args.seq_len,
            calibration_dtype=calibration or "auto",
        )
        ppl = reloaded_perplexity(checkpoint, blocks, work / name)
        size = weights_size(work / name)
        rows.append({"method": f"streamify {name}", "perplexity": ppl, "seconds": seconds, "bytes": size})
        print(rows[-1], flush=True)
    if not args.skip_llmcompressor:
        calibration = token_blocks(
            base.tokenizer, load_texts("builtin:pydoc", "train"), args.seq_len, args.samples * args.seq_len, seed=0
        )
        save_model_files(base, work / "fp32")  # the same float weights, as an HF folder
        seconds = llmcompressor(work / "fp32", calibration, work / "llmc", args.group_size)
        model = load_checkpoint(str(work / "llmc")).model
        rows.append(
            {
                "method": "llm-compressor gptq",
                "perplexity": perplexity(model, blocks, 1)["perplexity"],
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    for row in rows:
        row["rise_pct"] = round(100 * (row["perplexity"] / teacher - 1), 2)
    return rows


def part_two(base, blocks, work: Path) -> list[dict]:
    rows = []
    write_gguf(base, {}, "F16", _fresh(work / "f16"))
    f16 = work / "f16" / "model.gguf"
    rows.append(
        {
            "file": "streamify F16 export",
            "perplexity": llama_cpp_perplexity(f16, blocks),
            "seconds": None,
            "bytes": f16.stat().st_size,
        }
    )
    theirs = work / "llamacpp-q4_0.gguf"
    seconds = llama_cpp_quantize(f16, theirs)
    rows.append(
        {
            "file": "llama.cpp Q4_0 (llama_model_quantize of the F16 export)",
            "perplexity": llama_cpp_perplexity(theirs, blocks),
            "seconds": seconds,
            "bytes": theirs.stat().st_size,
        }
    )
    for method in ("rtn", "gptq"):
        checkpoint, seconds = quantize(
            method=method, group_size=32, weights_format="gguf", gguf_type="Q4_0", samples=32, seq_len=512
        )
        save_model_files(checkpoint, _fresh(work / f"q4_0-{method}"))
        path = work / f"q4_0-{method}" / "model.gguf"
        ppl = llama_cpp_perplexity(path, blocks)
        rows.append(
            {"file": f"streamify Q4_0 {method}", "perplexity": ppl, "seconds": seconds, "bytes": path.stat().st_size}
        )
    for row in rows:
        print(row, flush=True)
    return rows


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--methods", nargs="*", default=["rtn", "gptq", "gptq-bf16", "awq"], help="-bf16: bf16 calibration passes"
    )
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = load_checkpoint(MODEL)
    blocks = eval_data(base, EvalSpec(max_tokens=args.eval_tokens, seq_len=512))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        first = part_one(args, base, blocks, work)
        second = [] if args.skip_gguf else part_two(base, blocks, work)
    result = {
        "args": vars(args) | {"json": str(args.json)},
        "threads": torch.get_num_threads(),
        "w4a16": first,
        "gguf": second,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n| method (W4A16, group {args.group_size}) | held-out perplexity | rise | wall time |")
    print("|---|---|---|---|")
    for row in first:
        seconds = f"{row['seconds']:.1f} s" if row["seconds"] is not None else "-"
        print(f"| {row['method']} | {row['perplexity']:.3f} | {row['rise_pct']:+.2f}% | {seconds} |")
    print("\n| GGUF file (llama.cpp scores it) | perplexity | quantize time |")
    print("|---|---|---|")
    for row in second:
        seconds = f"{row['seconds']:.1f} s" if row["seconds"] is not None else "-"
        print(f"| {row['file']} | {row['perplexity']:.3f} | {seconds} |")


if __name__ == "__main__":
    main()
