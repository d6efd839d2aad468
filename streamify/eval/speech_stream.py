"""Streaming speech evaluation: every clip transcribed chunk by chunk as it would arrive; WER, latency, flicker."""

from __future__ import annotations

import numpy as np

from streamify.data.audio import read_clips
from streamify.io.checkpoint import Checkpoint
from streamify.kinds.speech import normalize
from streamify.progress import SILENT, Progress
from streamify.runtime.chunk_causal import CONFIG_KEY, ChunkSpec
from streamify.runtime.speech_encoder import whisper_chunks
from streamify.runtime.transcribe import audio_pieces, transcribe_stream


def chunk_spec(checkpoint: Checkpoint, chunk_ms: int | None, first_extra_ms: int | None = None) -> ChunkSpec:
    """The chunking asked for; what is not given is the model's own (``convert.causal``), else 300 ms and 0."""
    trained = getattr(checkpoint.model.config, CONFIG_KEY, None) or {}
    extra = first_extra_ms if first_extra_ms is not None else trained.get("first_extra_ms", 0)
    return whisper_chunks(chunk_ms or trained.get("chunk_ms", 300), extra, trained.get("left_chunks", 0))


def speech_stream_eval(
    checkpoint: Checkpoint,
    data: str,
    chunk_ms: int | None,
    max_items: int,
    commit: str = "agreement",
    progress: Progress = SILENT,
) -> dict:
    """Stream ``max_items`` clips of ``data``: WER of the committed text, per-chunk latency, real-time factor, flicker.

    Latency is the median and 95th percentile over all chunks of all clips; the
    real-time factor is compute time over audio time; flicker is the share of
    words that changed after they were first shown.
    """
    import jiwer

    spec = chunk_spec(checkpoint, chunk_ms)
    model, processor, tokenizer = checkpoint.model, checkpoint.processor, checkpoint.tokenizer
    clips = read_clips(data, processor.sampling_rate, max_items)
    texts, latencies, flicker, compute, heard = [], [], [], 0.0, 0.0
    for clip in progress.track(clips, f"streaming {spec.chunk_frames * 20} ms chunks", total=len(clips)):
        pieces = audio_pieces(clip.audio, spec, clip.rate, processor.n_fft // 2)
        result = transcribe_stream(model, processor, tokenizer, pieces, spec, commit=commit)
        texts.append(result["text"])
        steps = [step["compute_ms"] for step in result["steps"]]
        latencies += steps
        compute += sum(steps) / 1000
        heard += result["audio_seconds"]
        flicker.append((result["flicker"], len(result["text"].split())))
    references = [normalize(c.text) for c in clips]
    shown_words = sum(words for _, words in flicker)
    return {
        "chunk_ms": spec.chunk_frames * 20,
        "commit": commit,
        "clips": len(clips),
        "wer": jiwer.wer(references, [normalize(t) for t in texts]),
        "latency_ms_per_chunk": {
            "median": round(float(np.median(latencies)), 2),
            "p95": round(float(np.percentile(latencies, 95)), 2),
        },
        "real_time_factor": round(compute / heard, 4) if heard else 0.0,
        "flicker": round(sum(f * w for f, w in flicker) / shown_words, 4) if shown_words else 0.0,
        "transcripts": texts[:3],
    }
