"""Chunk-causal Whisper: the cached chunk-by-chunk encoder against one masked forward, and `streamify transcribe`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from transformers import WhisperForConditionalGeneration

from conftest import write_clips
from streamify.runtime.chunk_causal import ChunkSpec, enable_chunk_causal
from streamify.runtime.speech_encoder import StreamingEncoder, encode_heard, whisper_chunks


@pytest.mark.parametrize(
    ("chunk_frames", "first_extra", "left", "step"),
    [(15, 0, 0, 37), (7, 3, 0, 30), (2, 0, 0, 61), (15, 0, 0, 3000), (5, 2, 3, 44)],
)
@torch.inference_mode()
def test_cached_chunks_equal_one_forward_under_the_block_causal_mask(tiny_kinds, chunk_frames, first_extra, left, step):
    """Mel arriving ``step`` frames at a time; chunks of 7 with 3 extra end in a partial chunk (1497 = 213·7 + 6);
    with 3 chunks of left context the cache keeps only what later frames can see."""
    model = WhisperForConditionalGeneration.from_pretrained(tiny_kinds["speech-seq2seq"]).eval()
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    spec = ChunkSpec(chunk_frames, first_extra, left)
    bidirectional = model.get_encoder()(input_features=mel).last_hidden_state
    enable_chunk_causal(model, spec)
    reference = model.get_encoder()(input_features=mel).last_hidden_state
    encoder = StreamingEncoder(model, spec)
    pieces = [encoder.feed(mel[..., : min(end, 3000)], final=end >= 3000) for end in range(step, 3000 + step, step)]
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == reference.shape
    assert (streamed - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert (bidirectional - reference).abs().max() > 1e-2  # the mask does change the output
    if left:
        assert encoder.keys[0].shape[2] <= (left + 1) * chunk_frames


@pytest.mark.parametrize("frames", [45, 52])
@torch.inference_mode()
def test_training_encoder_on_the_heard_frames_equals_the_stream_at_its_end(tiny_kinds, frames):
    """What convert.causal trains on (the stock modules over the heard frames) is what the runtime encodes."""
    model = WhisperForConditionalGeneration.from_pretrained(tiny_kinds["speech-seq2seq"]).eval()
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    spec = ChunkSpec(15)
    enable_chunk_causal(model, spec)
    trained_on = encode_heard(model, mel, frames)
    encoder = StreamingEncoder(model, spec)
    streamed = torch.cat([encoder.feed(mel[..., :31]), encoder.feed(mel[..., : 2 * frames], final=True)], dim=1)
    assert trained_on.shape == streamed.shape == (1, frames, model.config.d_model)
    assert (trained_on - streamed).abs().max() <= 1e-5 * streamed.abs().max()
    whole = model.get_encoder()(input_features=mel).last_hidden_state[:, :frames]
    assert (whole - trained_on).abs().max() > 1e-3  # the last chunk's frames read no audio after the end


def test_chunk_sizes_must_be_whole_encoder_frames():
    from streamify.errors import UsageError

    assert whisper_chunks(300) == ChunkSpec(15, 0)
    with pytest.raises(UsageError, match="multiple of 20 ms"):
        whisper_chunks(250)
    assert [b for b in ChunkSpec(4, 2).bounds(15)] == [(0, 6), (6, 10), (10, 14), (14, 15)]


def test_transcribe_streams_a_file_and_reports_latency_and_flicker(tiny_kinds, cli, tmp_path):
    clips = write_clips(tmp_path / "clips", ["one two three"])
    wav = next(clips.glob("*.wav"))
    result = cli("transcribe", tiny_kinds["speech-seq2seq"], wav, "--chunk-ms", "200", "--offline", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["chunks"] == len(data["steps"]) == 5 + 1  # 1 s in chunks of 200 ms, then the final step
    # each piece: a chunk plus the 12.5 ms look-ahead that completes the mel frame read past it
    assert [s["heard_seconds"] for s in data["steps"]][:5] == [0.2125, 0.4125, 0.6125, 0.8125, 1.0]
    stable = [s["stable"] for s in data["steps"]]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(stable))  # never retracted
    assert data["text"] == stable[-1] and data["steps"][-1]["tentative"] == ""
    assert 0 <= data["flicker"] <= 1 and data["real_time_factor"] > 0 and "offline_text" in data
    assert data["latency_ms_per_chunk"]["p95"] >= data["latency_ms_per_chunk"]["median"] > 0


def test_probability_rule_cuts_at_the_first_recent_token_that_lost_ground(monkeypatch):
    """CarelessWhisper's rule on a scripted decoder: of the last two tokens, the first whose probability fell and
    that is no longer the argmax is dropped with what follows; older tokens are committed, never re-scored."""
    from streamify.runtime import transcribe

    streamer = object.__new__(transcribe.SpeechStreamer)
    streamer.prompt, streamer.state = [1], transcribe.StreamState()
    streamer.model = type("Model", (), {"config": type("Config", (), {"eos_token_id": 0})})()
    streamer.state.committed, streamer.state.previous = [5], [5, 6, 7, 8]
    streamer.state.probabilities = [0.9, 0.8, 0.7, 0.6]
    scored = {"now": [0.9, 0.1, 0.5, 0.7], "best": [5, 9, 9, 8]}  # 6 fell too, but it is older than two tokens
    monkeypatch.setattr(streamer, "_score", lambda encoded, tokens: (scored["now"], scored["best"]), raising=False)

    def decode(model, encoded, prompt, eos, limit, probabilities):
        assert prompt == [1, 5, 6]  # decoding goes on from the cut
        probabilities += [0.95, 0.85]
        return [10, 11]

    monkeypatch.setattr(transcribe, "greedy_decode", decode)
    streamer.state.previous = streamer._probability(object(), limit=20)  # as step() keeps it
    assert streamer.state.previous == [5, 6, 10, 11]
    assert streamer.state.probabilities == [0.9, 0.1, 0.95, 0.85]
    scored.update(now=[0.9, 0.1, 0.99, 0.5], best=[5, 9, 10, 11])  # 11 fell but is still the argmax: kept
    monkeypatch.setattr(transcribe, "greedy_decode", lambda *args: [])
    assert streamer._probability(object(), limit=20) == [5, 6, 10, 11]


def test_transcribe_with_the_probability_rule_never_retracts_stable_text(tiny_kinds, cli, tmp_path):
    wav = next(write_clips(tmp_path / "clips", ["one two three"]).glob("*.wav"))
    args = ["--chunk-ms", "100", "--commit", "probability", "--format", "json"]
    result = cli("transcribe", tiny_kinds["speech-seq2seq"], wav, *args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    stable = [s["stable"] for s in data["steps"]]
    assert data["commit"] == "probability" and data["text"] == stable[-1]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(stable))
    bad = cli("transcribe", tiny_kinds["speech-seq2seq"], wav, "--commit", "vote")
    assert bad.exit_code == 2 and "agreement, probability" in bad.stderr


def test_transcribe_reads_a_live_stream_from_stdin(tiny_kinds, tmp_path):
    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000) * 32767).astype("<i2").tobytes()
    args = [sys.executable, "-m", "streamify", "transcribe", str(tiny_kinds["speech-seq2seq"]), "-", "--format", "json"]
    done = subprocess.run([*args, "--chunk-ms", "100"], input=tone, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    data = json.loads(done.stdout)
    assert data["audio_seconds"] == 0.5 and data["chunks"] == 5 + 1


def test_transcribe_resamples_and_says_so(tiny_kinds, cli, tmp_path):
    wav = tmp_path / "8k.wav"
    soundfile.write(wav, np.zeros(8000, dtype=np.float32) + 0.01, 8000)
    result = cli("transcribe", tiny_kinds["speech-seq2seq"], wav, "--format", "json")
    assert result.exit_code == 0 and "resampled from 8000 Hz to 16000 Hz" in result.stderr
    assert json.loads(result.stdout)["audio_seconds"] == 1.0


@pytest.mark.parametrize(
    ("make", "args", "code", "message"),
    [
        (lambda p: p.write_text("not audio"), [], 3, "not audio"),
        (lambda p: soundfile.write(p, np.zeros(0, dtype=np.float32), 16000), [], 3, "no samples"),
        (lambda p: soundfile.write(p, np.zeros(100, dtype=np.float32), 16000), [], 3, "analysis window"),
        (lambda p: soundfile.write(p, np.zeros(1600, dtype=np.float32), 16000), ["--chunk-ms", "250"], 2, "20 ms"),
    ],
)
def test_bad_transcribe_input(tiny_kinds, cli, tmp_path, make, args, code, message):
    path = tmp_path / "in.wav"
    make(path)
    result = cli("transcribe", tiny_kinds["speech-seq2seq"], path, *args)
    assert result.exit_code == code and message in result.stderr, result.stderr


def test_transcribe_refuses_a_text_model(tiny_llama, cli, tmp_path):
    path = tmp_path / "in.wav"
    soundfile.write(path, np.zeros(1600, dtype=np.float32), 16000)
    result = cli("transcribe", tiny_llama, path)
    assert result.exit_code == 3 and "speech-seq2seq" in result.stderr
