"""Streaming speech recognition: audio in chunks, a chunk-causal encoder with a cache, re-decoding per chunk.

After each chunk the decoder decodes greedily from the prompt and the tokens
already committed, over the encoder frames heard so far. Two rules decide
what is committed (stable: shown for good); the rest of the hypothesis is
shown as tentative, and at the end of the input everything is committed:

- ``agreement`` (the default; whisper_streaming's local agreement of two): a
  token is committed once two consecutive hypotheses agree on it.
- ``probability`` (CarelessWhisper's rule): the hypothesis carries over from
  chunk to chunk; with each new chunk its last ``look_back`` tokens are
  scored again over the longer audio, and a token stays while its
  probability did not fall or it is still the most likely one; the first
  that fails is dropped with everything after it, and decoding goes on from
  there. Tokens older than the last ``look_back`` are committed.

A hypothesis is cut at 6 tokens per second of audio heard (speech runs at 3
to 4), so a model that loops on a short prefix (a known failure of chunked
Whisper) does not decode hundreds. The log-mel features are computed over the
audio heard so far, so their floor (8 log10 units under the loudest frame)
follows the audio so far; offline transcription pads to Whisper's 30 s as
usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from streamify.errors import InputError, UsageError
from streamify.kinds.speech import decode_limit, decoder_prompt, greedy_decode
from streamify.runtime.chunk_causal import ChunkSpec
from streamify.runtime.speech_encoder import FRAME_MS, StreamingEncoder

TOKENS_PER_SECOND = 6  # a hypothesis is cut at this many tokens per second heard (speech runs at about 3-4)
COMMIT_RULES = ("agreement", "probability")
LOOK_BACK = 2  # the probability rule re-scores the hypothesis's last two tokens (CarelessWhisper's default)


@dataclass
class ChunkStep:
    """What one chunk of audio produced: seconds heard, compute time, stable and tentative text."""

    index: int
    heard_seconds: float
    compute_ms: float
    stable: str
    tentative: str


@dataclass
class StreamState:
    """Committed tokens, the last hypothesis, and the first word shown at each position (for flicker)."""

    committed: list[int] = field(default_factory=list)
    previous: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)  # of each token of ``previous`` when it was scored
    first_shown: list[str] = field(default_factory=list)
    stable_chunk: list[int] = field(default_factory=list)


def check_commit(commit: str) -> None:
    """A :class:`UsageError` unless ``commit`` names a rule of :data:`COMMIT_RULES`."""
    if commit not in COMMIT_RULES:
        raise UsageError(f"--commit {commit}: unknown rule", f"use one of: {', '.join(COMMIT_RULES)}")


def _agreed(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


class SpeechStreamer:
    """Transcribes a 16 kHz mono stream chunk by chunk with ``model`` (a transformers Whisper)."""

    def __init__(self, model, processor, tokenizer, spec: ChunkSpec, commit: str = "agreement"):
        check_commit(commit)
        self.model, self.processor, self.tokenizer, self.spec = model, processor, tokenizer, spec
        self.commit = commit
        self.rate = processor.sampling_rate
        self.encoder = StreamingEncoder(model, spec)
        self.frames: list[torch.Tensor] = []
        self.state = StreamState()
        self.prompt = decoder_prompt(model)

    def _mel(self, audio: np.ndarray) -> torch.Tensor:
        features = self.processor(audio, sampling_rate=self.rate, padding="longest", return_tensors="pt")
        return features.input_features.to(next(self.model.parameters()).device, self.model.dtype)

    @torch.inference_mode()
    def step(self, audio: np.ndarray, index: int, final: bool) -> ChunkStep:
        """Encode what ``audio`` (all heard so far) completes and re-decode; commit by the streamer's rule.

        Before the end, only mel frames whose whole STFT window has been heard
        are used, so no frame is built from padding that later audio replaces.
        """
        began = time.perf_counter()
        half = self.processor.n_fft // 2
        if len(audio) > half:
            mel = self._mel(audio)
            if not final:
                mel = mel[..., : max(0, (len(audio) - half) // self.processor.hop_length + 1)]
            new = self.encoder.feed(mel, final=final)
        elif final:
            raise InputError(
                f"the audio is {len(audio)} samples, shorter than one {self.processor.n_fft}-sample analysis window",
                "give a clip of at least a few hundred milliseconds",
            )
        else:
            new = torch.zeros(1, 0, 1)
        if new.shape[1]:
            self.frames.append(new)
        state = self.state
        limit = min(decode_limit(self.model), int(TOKENS_PER_SECOND * len(audio) / self.rate) + 2)  # no runaway
        encoded = BaseModelOutput(last_hidden_state=torch.cat(self.frames, dim=1)) if self.frames else None
        if self.commit == "agreement":
            hypothesis = self._agreement(encoded, limit)
            keep = _agreed(hypothesis, state.previous)
        else:
            hypothesis = self._probability(encoded, limit)
            keep = len(hypothesis) - LOOK_BACK
        keep = len(hypothesis) if final else keep
        if keep > len(state.committed):
            state.stable_chunk += [index] * (keep - len(state.committed))
            state.committed = hypothesis[:keep]
        state.previous = hypothesis
        stable = self.tokenizer.decode(state.committed, skip_special_tokens=True)
        tentative = self.tokenizer.decode(hypothesis[len(state.committed) :], skip_special_tokens=True)
        words = (stable + tentative).split()
        state.first_shown += words[len(state.first_shown) :]
        seconds = len(audio) / self.rate
        return ChunkStep(index, seconds, 1000 * (time.perf_counter() - began), stable, tentative)

    def _agreement(self, encoded: BaseModelOutput | None, limit: int) -> list[int]:
        """A new hypothesis: the committed tokens, then greedy decoding."""
        committed = self.state.committed
        if encoded is None:
            return list(committed)
        eos = self.model.config.eos_token_id
        return committed + greedy_decode(self.model, encoded, self.prompt + committed, eos, limit - len(committed))

    def _probability(self, encoded: BaseModelOutput | None, limit: int) -> list[int]:
        """The last hypothesis, its uncommitted last ``LOOK_BACK`` tokens re-scored and cut at the first that
        lost probability and is no longer the most likely; then greedy decoding goes on from it."""
        state = self.state
        hypothesis = list(state.previous)
        if encoded is None:
            return hypothesis
        if len(hypothesis) > len(state.committed):
            now, best = self._score(encoded, hypothesis)
            for position in range(max(len(state.committed), len(hypothesis) - LOOK_BACK), len(hypothesis)):
                if now[position] < state.probabilities[position] and best[position] != hypothesis[position]:
                    hypothesis, now = hypothesis[:position], now[:position]
                    break
            state.probabilities = now
        probabilities: list[float] = []
        eos = self.model.config.eos_token_id
        prefix = self.prompt + hypothesis
        hypothesis += greedy_decode(self.model, encoded, prefix, eos, limit - len(hypothesis), probabilities)
        state.probabilities = state.probabilities + probabilities
        return hypothesis

    @torch.inference_mode()
    def _score(self, encoded: BaseModelOutput, tokens: list[int]) -> tuple[list[float], list[int]]:
        """Each token's probability given the audio and the tokens before it, and the most likely token there."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt + tokens[:-1]], device=device)
        logits = self.model(encoder_outputs=encoded, decoder_input_ids=ids).logits[0, len(self.prompt) - 1 :]
        probabilities = logits.float().softmax(-1)
        chosen = probabilities.gather(-1, torch.tensor(tokens, device=device)[:, None])[:, 0]
        return chosen.tolist(), probabilities.argmax(-1).tolist()

    def summary(self, steps: list[ChunkStep]) -> dict:
        """Final text, per-chunk latency, real-time factor and flicker of a finished stream."""
        text = self.tokenizer.decode(self.state.committed, skip_special_tokens=True)
        final_words = text.split()
        shown = self.state.first_shown[: len(final_words)]
        changed = sum(a != b for a, b in zip(shown, final_words, strict=False))
        latencies = np.array([s.compute_ms for s in steps])
        heard = steps[-1].heard_seconds if steps else 0.0
        return {
            "text": text,
            "chunk_ms": self.spec.chunk_frames * FRAME_MS,
            "chunks": len(steps),
            "audio_seconds": round(heard, 3),
            "latency_ms_per_chunk": {
                "median": round(float(np.median(latencies)), 2) if len(latencies) else 0.0,
                "p95": round(float(np.percentile(latencies, 95)), 2) if len(latencies) else 0.0,
            },
            "real_time_factor": round(float(latencies.sum()) / 1000 / heard, 4) if heard else 0.0,
            "flicker": round(changed / len(final_words), 4) if final_words else 0.0,
            "commit": self.commit,
            "encoder_cache_bytes": self.encoder.cache_bytes(),
        }


def first_piece(spec: ChunkSpec, rate: int, lookahead: int) -> int:
    """Samples of the first piece: the first chunk with its extra frames, plus the ``lookahead`` samples that
    complete the mel frame the front end reads past it (half an STFT window: 12.5 ms for Whisper)."""
    return (spec.chunk_frames + spec.first_extra) * FRAME_MS * rate // 1000 + lookahead


def audio_pieces(audio: np.ndarray, spec: ChunkSpec, rate: int, lookahead: int) -> Iterator[np.ndarray]:
    """``audio`` cut as it would arrive: the first piece (:func:`first_piece`), then a chunk at a time; each
    piece completes one chunk of encoder frames."""
    size = spec.chunk_frames * FRAME_MS * rate // 1000
    first = first_piece(spec, rate, lookahead)
    yield audio[:first]
    for start in range(first, len(audio), size):
        yield audio[start : start + size]


def transcribe_stream(
    model,
    processor,
    tokenizer,
    pieces: Iterable[np.ndarray],
    spec: ChunkSpec,
    on_step: Callable[[ChunkStep], None] | None = None,
    commit: str = "agreement",
) -> dict:
    """Transcribe 16 kHz mono audio arriving in ``pieces``; after the last, a final step commits the rest.
    ``commit`` is the rule that decides what is stable (:data:`COMMIT_RULES`).

    Returns the summary (:meth:`SpeechStreamer.summary`) with every chunk's step.
    """
    rate = processor.sampling_rate
    longest = model.config.max_source_positions * FRAME_MS / 1000
    streamer = SpeechStreamer(model, processor, tokenizer, spec, commit)
    heard = np.zeros(0, dtype=np.float32)
    steps = []
    for index, piece in enumerate(pieces):
        heard = np.concatenate([heard, piece.astype(np.float32)])
        if len(heard) / rate > longest:
            raise InputError(
                f"the audio passed {longest:.0f} s, the most a Whisper window holds (the stream goes on)",
                "cut the audio into pieces of at most 30 s",
            )
        steps.append(streamer.step(heard, index, final=False))
        if on_step is not None:
            on_step(steps[-1])
    if not len(heard):
        raise InputError("the audio holds no samples", "give a clip with sound in it")
    steps.append(streamer.step(heard, len(steps), final=True))
    if on_step is not None:
        on_step(steps[-1])
    result = streamer.summary(steps)
    result["steps"] = [step.__dict__ for step in steps]
    return result


@torch.inference_mode()
def transcribe_offline(model, processor, tokenizer, audio: np.ndarray) -> str:
    """The whole clip at once (padded to 30 s), greedy: the offline transcript to compare with."""
    features = processor(audio, sampling_rate=processor.sampling_rate, return_tensors="pt").input_features
    features = features.to(next(model.parameters()).device, model.dtype)
    encoded = model.get_encoder()(input_features=features)
    prompt = decoder_prompt(model)
    ids = greedy_decode(model, encoded, prompt, model.config.eos_token_id, decode_limit(model))
    return tokenizer.decode(ids, skip_special_tokens=True)
