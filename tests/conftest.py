"""Shared fixtures: a small byte-level BPE tokenizer and tiny random models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes the tests start, too
    torch.set_num_threads(1)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from streamify.cli.app import app
from streamify.data.pydoc import pydoc_texts

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
CONFIGS = {
    "llama": {"model_type": "llama", **TINY},
    "qwen2": {"model_type": "qwen2", **TINY},
    "mistral": {"model_type": "mistral", **TINY, "sliding_window": 64},
    "qwen3": {"model_type": "qwen3", **TINY, "head_dim": 8},
    "gemma": {"model_type": "gemma", **TINY, "head_dim": 8},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 1024},
}


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """streamify's cache (stage outputs, training checkpoints, GGUF dequantization) in a folder of the session."""
    folder = tmp_path_factory.mktemp("streamify-cache")
    os.environ["STREAMIFY_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 384-token byte-level BPE tokenizer trained on a slice of builtin:pydoc's train split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(pydoc_texts("train")[:200], trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return folder


def tiny_model(model_type: str, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` over the test tokenizer's 384 tokens, in eval mode."""
    torch.manual_seed(seed)
    options = {"vocab_size": 384, "eos_token_id": 0, **config}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options)).eval()


def build_tiny(arch: str, tokenizer_dir: Path, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``arch`` with the test tokenizer into ``folder``."""
    spec = dict(CONFIGS[arch])
    tiny_model(spec.pop("model_type"), seed, **spec).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One saved tiny random model per architecture in CONFIGS (read-only: copy before changing)."""
    return {arch: build_tiny(arch, tokenizer_dir, tmp_path_factory.mktemp(arch)) for arch in CONFIGS}


@pytest.fixture
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


class Cli:
    """Run the streamify CLI in-process; returns the click Result (exit_code, stdout, stderr)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str):
        return self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


QUICK_EVAL = ["eval.max_tokens=256", "eval.seq_len=64"]


SPEECH_SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


@pytest.fixture(scope="session")
def tiny_kinds(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One saved tiny random model of each non-text-decoder kind: Whisper (speech), BERT (encoder), Wan (denoiser)."""
    from diffusers import WanTransformer3DModel
    from transformers import (
        BertConfig,
        BertModel,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("kinds")
    text = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    speech = PreTrainedTokenizerFast(
        tokenizer_object=text.backend_tokenizer,
        eos_token=SPEECH_SPECIALS[0],
        additional_special_tokens=list(SPEECH_SPECIALS[1:]),
    )
    ids = {token: speech.convert_tokens_to_ids(token) for token in SPEECH_SPECIALS}
    torch.manual_seed(0)
    end = ids["<|endoftext|>"]
    whisper = WhisperForConditionalGeneration(
        WhisperConfig(
            vocab_size=len(speech),
            num_mel_bins=80,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            d_model=32,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=1500,
            max_target_positions=64,
            decoder_start_token_id=ids["<|startoftranscript|>"],
            pad_token_id=end,
            eos_token_id=end,
            bos_token_id=end,
        )
    )
    whisper.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=end,
        pad_token_id=end,
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=True,
    )
    whisper.save_pretrained(root / "whisper")
    speech.save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    bert = BertModel(
        BertConfig(
            vocab_size=384,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
        )
    )
    bert.config.architectures = ["BertModel"]
    bert.save_pretrained(root / "bert")
    text.save_pretrained(root / "bert")
    WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ).save_pretrained(root / "wan")
    return {"speech-seq2seq": root / "whisper", "encoder": root / "bert", "denoiser": root / "wan"}


def write_clips(folder: Path, texts: list[str], rate: int = 16000) -> Path:
    """One second of a different tone per text, as 16-bit WAV files with same-name transcripts."""
    import numpy as np
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * index) * np.arange(rate) / rate)
        soundfile.write(folder / f"clip{index:02d}.wav", tone.astype(np.float32), rate, subtype="PCM_16")
        (folder / f"clip{index:02d}.txt").write_text(text)
    return folder


def killed_at_call(train, call: int):
    """``train`` whose loss function raises KeyboardInterrupt at its ``call``-th call (a killed run)."""

    def dying_train(model, blocks, loss_fn, settings, **kwargs):
        calls = {"count": 0}

        def dying(batch):
            calls["count"] += 1
            if calls["count"] == call:
                raise KeyboardInterrupt("killed")
            return loss_fn(batch)

        return train(model, blocks, dying, settings, **kwargs)

    return dying_train
