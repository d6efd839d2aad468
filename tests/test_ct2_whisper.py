"""CTranslate2 Whisper folders as sources: converted back to transformers, checked against ctranslate2 itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from conftest import write_clips
from streamify.io.load import load_checkpoint
from streamify.kinds.speech import decoder_prompt, greedy_decode

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (the reference) is a test dependency")


def _ct2(whisper, folder, quantization=None):
    converter = ctranslate2.converters.TransformersConverter(str(whisper), copy_files=["tokenizer.json"])
    converter.convert(str(folder), quantization=quantization, force=True)
    return folder


@pytest.fixture(scope="module")
def ct2_tiny(tiny_kinds, tmp_path_factory):
    """The suite's tiny random Whisper, written by ctranslate2's own converter (fp32)."""
    return _ct2(tiny_kinds["speech-seq2seq"], tmp_path_factory.mktemp("ct2") / "tiny")


def test_ctranslate2s_conversion_converts_back_to_identical_weights(tiny_kinds, ct2_tiny):
    original = WhisperForConditionalGeneration.from_pretrained(tiny_kinds["speech-seq2seq"]).state_dict()
    converted = load_checkpoint(str(ct2_tiny)).model
    ours = converted.state_dict()
    assert converted.dtype == torch.float32 and set(ours) == set(original)
    for name, tensor in original.items():
        assert torch.equal(ours[name], tensor), name
    for key in ("d_model", "encoder_layers", "decoder_attention_heads", "max_target_positions", "num_mel_bins"):
        assert (
            getattr(converted.config, key)
            == json.loads((tiny_kinds["speech-seq2seq"] / "config.json").read_text())[key]
        )


def test_int8_weights_are_dequantized_by_their_row_scales(tiny_kinds, tmp_path):
    original = WhisperForConditionalGeneration.from_pretrained(tiny_kinds["speech-seq2seq"]).state_dict()
    ours = load_checkpoint(str(_ct2(tiny_kinds["speech-seq2seq"], tmp_path / "int8", "int8"))).model.state_dict()
    for name in (
        "model.encoder.layers.0.fc1.weight",
        "model.encoder.conv1.weight",
        "model.decoder.embed_tokens.weight",
    ):
        weight = original[name].flatten(1)  # ctranslate2 also stores convolutions and embeddings in int8
        step = weight.abs().amax(dim=1, keepdim=True) / 127  # one scale per row
        error = (ours[name].flatten(1) - weight).abs()
        assert (error <= step / 2 + 1e-6).all() and error.max() > 0, name


@torch.inference_mode()
def test_converted_model_decodes_as_ctranslate2_does(ct2_tiny, tmp_path):
    checkpoint = load_checkpoint(str(ct2_tiny))
    model = checkpoint.model
    clips = write_clips(tmp_path / "clips", ["one", "two"])
    audio = [np.asarray(__import__("soundfile").read(p)[0], dtype=np.float32) for p in sorted(clips.glob("*.wav"))]
    features = checkpoint.processor(audio, sampling_rate=16000, return_tensors="np").input_features
    reference = ctranslate2.models.Whisper(str(ct2_tiny), device="cpu", compute_type="float32")
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    encoded = model.get_encoder()(input_features=torch.from_numpy(features))
    assert np.abs(encoded.last_hidden_state.numpy() - theirs).max() <= 1e-4 * np.abs(theirs).max()
    prompt = decoder_prompt(model)
    generated = reference.generate(
        ctranslate2.StorageView.from_array(features),
        [prompt] * len(audio),
        beam_size=1,
        max_length=40,  # ctranslate2 decodes at most half of it, as openai-whisper does: 20 tokens
        suppress_blank=False,
        suppress_tokens=[],
    )
    for row, result in enumerate(generated):
        one = type(encoded)(last_hidden_state=encoded.last_hidden_state[row : row + 1])
        theirs = result.sequences_ids[0]
        assert len(theirs) >= 10
        assert greedy_decode(model, one, prompt, model.config.eos_token_id, len(theirs)) == theirs


def test_cli_reads_a_ctranslate2_folder(ct2_tiny, cli, tmp_path):
    info = cli("inspect", ct2_tiny, "--format", "json")
    assert info.exit_code == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["format"] == "ctranslate2" and described["kind"] == "speech-seq2seq"
    clips = write_clips(tmp_path / "clips", ["one", "two"])
    result = cli("eval", ct2_tiny, "--data", clips, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["wer"] >= 0
    out = tmp_path / "bf16"
    assert cli("convert", "dtype", ct2_tiny, "-o", out, "--no-eval").exit_code == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "whisper"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "model.bin").write_bytes((f / "model.bin").read_bytes()[:5000]), "truncated"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
        (
            lambda f: (f / "model.bin").write_bytes(b"\x06\x00\x00\x00\x10\x00TransformerSpec\x00" + b"\x00" * 64),
            "TransformerSpec",
        ),
    ],
)
def test_broken_ctranslate2_folders_are_clear_errors(ct2_tiny, cli, tmp_path, damage, message):
    folder = tmp_path / "broken"
    shutil.copytree(ct2_tiny, folder)
    damage(folder)
    result = cli("inspect", folder)
    assert result.exit_code == 3 and message in result.stderr, result.stderr
