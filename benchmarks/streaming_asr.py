"""Streaming ASR on the built-in Whisper tiny.en: offline, naive chunked and causal-LoRA, side by side.

Usage:  .venv/bin/python benchmarks/streaming_asr.py [--steps 300] [--lr 1e-3] [--chunks 40,100,300]
            [--train-chunk 300] [--multi] [--items 32] [--json out.json]

Rows, all on the same held-out ``builtin:speech`` clips in one run:

- offline: the stock model on each whole clip (``streamify eval``'s ``wer``);
- naive chunked: the stock weights under the block-causal mask (``convert causal
  --steps 0``, CarelessWhisper's baseline), streamed at each chunk size;
- causal LoRA: ``convert causal --steps N`` trained at ``--train-chunk``, streamed
  at each chunk size (local agreement; at the trained size also CarelessWhisper's
  probability rule); ``--multi`` adds one model trained on all the chunk sizes;
- each trained model's weights run bidirectionally on whole clips (mask off):
  what the adapters did to offline recognition.

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


def convert(out: Path, steps: int, lr: str, chunk_ms: int, chunk_list: list[int]) -> dict:
    args = ["convert", "causal", MODEL, "-o", str(out), "--steps", str(steps), "--lr", lr, "--chunk-ms", str(chunk_ms)]
    if chunk_list:
        args += ["--chunk-ms-list", ",".join(map(str, chunk_list))]
    return run_json(*args, "--dtype", "fp32", "--no-eval")


def streamed(model: str, chunk_ms: int, items: int, commit: str) -> dict:
    args = ["eval", model, "--stream", "--chunk-ms", str(chunk_ms), "--max-items", str(items), "--commit", commit]
    return run_json(*args)["stream"]


def bidirectional_wer(folder: Path, items: int) -> float:
    """WER of the model's weights with the chunk mask off, whole clips (30 s window), greedy."""
    import jiwer

    from streamify.data.audio import read_clips
    from streamify.io.load import load_checkpoint
    from streamify.kinds.speech import normalize
    from streamify.runtime.chunk_causal import set_chunks
    from streamify.runtime.transcribe import transcribe_offline

    checkpoint = load_checkpoint(str(folder), dtype="fp32")
    set_chunks(checkpoint.model, None)
    clips = read_clips("builtin:speech", checkpoint.processor.sampling_rate, items)
    model, processor, tokenizer = checkpoint.model, checkpoint.processor, checkpoint.tokenizer
    guesses = [normalize(transcribe_offline(model, processor, tokenizer, c.audio)) for c in clips]
    return jiwer.wer([normalize(c.text) for c in clips], guesses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--chunks", default="40,100,300", help="chunk sizes in ms to stream at")
    parser.add_argument("--train-chunk", type=int, default=300, help="the single-latency model's chunk (ms)")
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
        models[f"causal LoRA ({args.steps} steps at {args.train_chunk} ms)"] = (Path(tmp) / "lora", args.steps, [])
        if args.multi:
            models[f"causal LoRA ({args.steps} steps, multi-latency)"] = (Path(tmp) / "multi", args.steps, chunks)
        for name, (folder, steps, chunk_list) in models.items():
            made = convert(folder, steps, args.lr, args.train_chunk, chunk_list)
            seconds = made["stages"][0]["seconds"]
            runs = [(chunk_ms, "agreement") for chunk_ms in chunks]
            if steps and not chunk_list:
                runs.append((args.train_chunk, "probability"))
            for chunk_ms, commit in runs:
                found = streamed(str(folder), chunk_ms, args.items, commit)
                rows.append({"model": name, "train_seconds": seconds, **found})
                print(
                    f"{name} @ {chunk_ms} ms ({commit}): WER {found['wer']:.4f}, latency median "
                    f"{found['latency_ms_per_chunk']['median']:.1f} ms p95 {found['latency_ms_per_chunk']['p95']:.1f}"
                    f" ms, RTF {found['real_time_factor']:.3f}, flicker {found['flicker']:.3f}",
                    flush=True,
                )
            if steps:
                wer = bidirectional_wer(folder, args.items)
                rows.append({"model": name, "chunk_ms": None, "mask": "off", "wer": wer})
                print(f"{name}, mask off, whole clips: WER {wer:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
