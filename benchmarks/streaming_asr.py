"""Streaming ASR on the built-in Whisper tiny.en: offline, naive chunked and causal-LoRA, side by side.

Usage:  .venv/bin/python benchmarks/streaming_asr.py [--steps 60] [--chunks 300,1000] [--items 32] [--json out.json]

Rows, all on the same held-out ``builtin:speech`` clips in one run:

- offline: the stock model on each whole clip (``streamify eval``'s ``wer``);
- naive chunked: the stock weights under the block-causal mask (``convert causal
  --steps 0``, CarelessWhisper's baseline), streamed at each chunk size;
- causal LoRA: ``convert causal --steps N`` at the first chunk size (``--multi``
  adds a model trained on all the chunk sizes), streamed at each chunk size.

Streaming rows report WER of the committed text, per-chunk latency (median,
p95), the real-time factor (compute over audio time, this machine's cores) and
flicker (share of words changed after first shown).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = "builtin:whisper-tiny-en"
STREAMIFY = [sys.executable, "-m", "streamify"]


def run_json(*args: str) -> dict:
    done = subprocess.run([*STREAMIFY, *args, "--format", "json"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def convert(out: Path, steps: int, chunk_ms: int, chunk_list: list[int]) -> dict:
    args = ["convert", "causal", MODEL, "-o", str(out), "--steps", str(steps), "--chunk-ms", str(chunk_ms)]
    if chunk_list:
        args += ["--chunk-ms-list", ",".join(map(str, chunk_list))]
    return run_json(*args, "--dtype", "fp32", "--no-eval")


def streamed(model: str, chunk_ms: int, items: int) -> dict:
    found = run_json("eval", model, "--stream", "--chunk-ms", str(chunk_ms), "--max-items", str(items))
    return found["stream"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--chunks", default="300,1000", help="chunk sizes in ms (the first is trained)")
    parser.add_argument("--multi", action="store_true", help="also train one model on all the chunk sizes")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    offline = run_json("eval", MODEL, "--dtype", "fp32", "--max-items", str(args.items))["model"]
    rows.append({"model": "offline (whole clip)", "chunk_ms": None, "wer": offline["wer"]})
    print(f"offline: WER {offline['wer']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"naive chunked": (Path(tmp) / "naive", 0, [])}
        models[f"causal LoRA ({args.steps} steps, {chunks[0]} ms)"] = (Path(tmp) / "lora", args.steps, [])
        if args.multi:
            models[f"causal LoRA ({args.steps} steps, multi-latency)"] = (Path(tmp) / "multi", args.steps, chunks)
        for name, (folder, steps, chunk_list) in models.items():
            made = convert(folder, steps, chunks[0], chunk_list)
            seconds = made["stages"][0]["seconds"]
            for chunk_ms in chunks:
                found = streamed(str(folder), chunk_ms, args.items)
                rows.append({"model": name, "train_seconds": seconds, **found})
                print(
                    f"{name} @ {chunk_ms} ms: WER {found['wer']:.4f}, latency median "
                    f"{found['latency_ms_per_chunk']['median']:.1f} ms p95 {found['latency_ms_per_chunk']['p95']:.1f}"
                    f" ms, RTF {found['real_time_factor']:.3f}, flicker {found['flicker']:.3f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
