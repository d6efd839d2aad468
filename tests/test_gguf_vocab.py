"""GGUF export from an HF source: llama.cpp tokenizes as the HF tokenizer does and reads the rope scaling."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from conftest import TINY
from streamify.data.pydoc import pydoc_texts
from streamify.io.load import load_checkpoint
from streamify.quantize.int4.gguf import GGUF_NAME, write_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency: run make test")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _tokenizer(pre_tokenizer) -> PreTrainedTokenizerFast:
    """A 384-token byte-level BPE over ``pre_tokenizer`` that puts BOS first, as Llama 3's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(pydoc_texts("train")[:200], trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def _llama3_split():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


LAYOUTS = {  # how each family's tokenizer.json splits text, and the names llama.cpp gives that split
    "llama3": (_llama3_split, {"llama3", "llama-v3", "llama-bpe"}),
    "smollm": (
        lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        {"smollm"},
    ),
    "gpt2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False), {"gpt-2"}),
}


def _model(folder, tokenizer, rope: dict) -> None:
    """A tiny Llama whose attention is peaked (q and k scaled up), so positions visibly move its logits."""
    config = AutoConfig.for_model("llama", vocab_size=384, bos_token_id=0, eos_token_id=1, rope_parameters=rope, **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """A tiny Llama with Llama 3's tokenizer layout (regex split, BOS added) and Llama 3 rope scaling."""
    folder = tmp_path_factory.mktemp("llama3-style")
    _model(folder, _tokenizer(_llama3_split()), LLAMA3_ROPE)
    return folder


def _float_gguf(source, folder):
    checkpoint = load_checkpoint(str(source))
    write_gguf(checkpoint, {}, "F16", folder)
    return checkpoint, folder / GGUF_NAME


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llama_cpp_tokenizes_an_hf_tokenizer_export_as_hf_does(layout, tmp_path):
    """Held-out Python docs, digits and runs of spaces included: llama.cpp's ids are the HF tokenizer's."""
    split, names = LAYOUTS[layout]
    _model(tmp_path / "m", _tokenizer(split()), LLAMA3_ROPE)
    checkpoint, path = _float_gguf(tmp_path / "m", tmp_path)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() in names
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = pydoc_texts("heldout")[:40]
    assert sum(len(t) for t in texts) > 50_000
    for text in texts:
        ours = checkpoint.tokenizer(text)["input_ids"]
        assert ours[0] == 0 and llm.tokenize(text.encode(), add_bos=True, special=False) == ours


def test_llama_cpp_reads_llama3_rope_scaling(llama3_style, tmp_path):
    """rope_freqs holds Llama 3's per-frequency divisors; llama.cpp's logits follow the scaled model's.

    Measured: llama.cpp is 2.9e-4 from the scaled model (fp16 weights), which is 4.6e-2 from the
    same weights without the scaling (a GGUF that dropped it).
    """
    checkpoint, path = _float_gguf(llama3_style, tmp_path)
    (freqs,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    # head_dim 8, theta 1e4: wavelengths 2π·(1, 10, 100, 1000); Llama 3 divides those above 256 (the original
    # context / low_freq_factor) by 8 and keeps those under 64 (/ high_freq_factor)
    assert np.allclose(freqs.data, [1, 1, 8, 8], rtol=1e-6)
    ids = list(range(5, 133))
    with torch.no_grad():
        scaled = checkpoint.model(torch.tensor([ids])).logits[0].numpy()
        plain = AutoModelForCausalLM.from_pretrained(
            llama3_style, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
        )
        unscaled = plain(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    assert np.abs(theirs - scaled).max() < 0.1 * np.abs(unscaled - scaled).max()


@pytest.mark.parametrize(
    ("tokenizer", "rope", "message"),
    [
        (lambda: _tokenizer(pre_tokenizers.Whitespace()), LLAMA3_ROPE, "pre-tokenizer"),
        (lambda: _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True)), LLAMA3_ROPE, "pre-tokenizer"),
        (lambda: _tokenizer(_llama3_split()), {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "yarn"),
    ],
)
def test_what_llama_cpp_would_read_differently_is_refused_before_calibration(tmp_path, cli, tokenizer, rope, message):
    _model(tmp_path / "m", tokenizer(), rope)
    args = ["quantize", "int4", tmp_path / "m", "-o", tmp_path / "out", "--weights-format", "gguf"]
    result = cli(*args, "--method", "gptq", "--group-size", "32", "--no-eval")
    assert result.exit_code == 3, result.stderr
    assert message in result.stderr and "compressed-tensors" in result.stderr
    assert "calibrat" not in result.stderr and not (tmp_path / "out").exists()
