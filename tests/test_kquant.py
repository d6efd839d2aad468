"""GGUF Q4_K: our codes on its grid, packed bit-exactly as gguf decodes them, and run in llama.cpp."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import streamify
from streamify.quantize.int4.gptq import HessianAccumulator, gptq
from streamify.quantize.int4.grid import rtn, rtn_k
from streamify.quantize.int4.kquant import pack_q4_k

Q4_K = gguf.GGMLQuantizationType.Q4_K


def _weight() -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.randn(16, 512) * 0.05
    weight[0, :256] = weight[0, :256].abs()  # a super-block without negative weights (its minimum is 0)
    weight[1] = 0  # an all-zero row: d = dmin = 0
    weight[2, :32] = 1e-6  # a sub-block far smaller than its neighbours
    return weight


def test_q4_k_blocks_decode_with_ggufs_own_dequantizer_bit_for_bit():
    for q in (rtn_k(_weight()), gptq(_weight(), torch.eye(512), 32, False, torch.float32, kquant=True)):
        decoded = gguf.quants.dequantize(pack_q4_k(q.codes, q.super_scales, q.sub_scales), Q4_K)
        assert np.array_equal(decoded, q.dequantize(torch.float32).numpy())
        assert q.sub_scales.max() <= 63 and q.codes.min() >= -8 and q.codes.max() <= 7
    # 6-bit scales and minimums cost little: as close as Q4_1's float-scaled groups of 32 (measured 0.98x)
    k_error = (rtn_k(_weight()).dequantize(torch.float32) - _weight()).pow(2).mean()
    q4_1_error = (rtn(_weight(), 32, False, torch.float32).dequantize(torch.float32) - _weight()).pow(2).mean()
    assert k_error < 1.1 * q4_1_error


def test_gptq_on_the_k_grid_beats_rtn_on_it():
    torch.manual_seed(0)
    inputs = torch.randn(2048, 256) @ torch.randn(256, 256)
    weight = torch.randn(32, 256)
    acc = HessianAccumulator(256, torch.device("cpu"))
    acc.add(inputs)
    reference = inputs @ weight.T
    errors = {
        name: (inputs @ q.dequantize(torch.float32).T - reference).pow(2).mean().item()
        for name, q in {
            "rtn_k": rtn_k(weight),
            "gptq_k": gptq(weight, acc.hessian, 32, False, torch.float32, kquant=True),
            "gptq_k act-order": gptq(weight, acc.hessian, 32, False, torch.float32, act_order=True, kquant=True),
            "rtn q4_1": rtn(weight, 32, False, torch.float16),
        }.items()
    }
    assert errors["gptq_k"] < 0.8 * errors["rtn_k"] and errors["gptq_k act-order"] < 0.8 * errors["rtn_k"], errors


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer_dir):
    """A Llama whose linears' inputs (256, 512) fill whole Q4_K super-blocks."""
    from transformers import PreTrainedTokenizerFast

    config = AutoConfig.for_model(
        "llama",
        vocab_size=384,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_q4_k_artifact_runs_in_llama_cpp_with_our_weights(wide_llama, tmp_path, cli):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency: run make test")
    args = ["--method", "gptq", "--asym", "--weights-format", "gguf", "--gguf-type", "Q4_K", "--samples", "8"]
    result = cli("quantize", "int4", wide_llama, "-o", tmp_path / "k", *args, "--seq-len", "64", "--no-eval")
    assert result.exit_code == 0, result.stderr
    types = _types(tmp_path / "k" / "model.gguf")
    linears = {name: kind for name, kind in types.items() if name.startswith("blk.") and "norm" not in name}
    assert len(linears) == 14 and set(linears.values()) == {"Q4_K"}
    assert types["token_embd.weight"] == "Q8_0"
    metrics = json.loads((tmp_path / "k" / "streamify.json").read_text())["stages"][0]["metrics"]
    assert metrics["gguf_tensor_types"] == {"Q4_K": 14, "Q4_1": 0}
    ids = list(range(5, 69))
    ours, _ = streamify.load(str(tmp_path / "k"))  # transformers' GGUF reader dequantizes Q4_K itself
    original = AutoModelForCausalLM.from_pretrained(wide_llama)
    with torch.no_grad():
        reloaded = ours(torch.tensor([ids])).logits[0].numpy()
        source = original(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "k" / "model.gguf"), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    quantization = np.abs(source - reloaded).max()
    assert np.abs(theirs - reloaded).max() < 0.25 * quantization


def test_rows_that_do_not_fill_a_super_block_are_written_q4_1_and_reported(tiny_llama, tmp_path, cli):
    args = ["--method", "rtn", "--asym", "--weights-format", "gguf", "--gguf-type", "Q4_K", "--no-eval"]
    result = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "k", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["gguf_tensor_types"] == {"Q4_K": 0, "Q4_1": 28} and len(metrics["q4_1_instead_of_q4_k"]) == 28
    assert "not a multiple of 256" in result.stderr
    assert {k for n, k in _types(tmp_path / "k" / "model.gguf").items() if "_proj" in n or "attn_" in n} <= {
        "Q4_1",
        "F32",
    }
