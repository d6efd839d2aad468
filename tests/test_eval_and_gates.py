"""Eval numbers checked against an independent computation; gates exit 5 or 0."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM

from conftest import QUICK_EVAL
from streamify.eval.report import EvalSpec, eval_data
from streamify.io.load import load_checkpoint


def test_eval_perplexity_matches_transformers_loss(cli, tiny_llama):
    result = cli("eval", tiny_llama, "--max-tokens", "512", "--seq-len", "64", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["model"]
    assert {
        "perplexity",
        "tokens",
        "params",
        "size_bytes",
        "bits_per_weight",
        "load_seconds",
        "peak_memory_bytes",
    } <= set(report)

    checkpoint = load_checkpoint(str(tiny_llama))
    blocks = eval_data(checkpoint, EvalSpec(max_tokens=512, seq_len=64))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():  # transformers' own mean loss per window, averaged over equal-size windows
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    assert report["tokens"] == blocks.shape[0] * 63 == 8 * 63
    assert math.isclose(report["perplexity"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
    weights = tiny_llama / "model.safetensors"
    assert report["size_bytes"] == weights.stat().st_size
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert math.isclose(report["bits_per_weight"], 8 * report["size_bytes"] / report["params"])


def test_eval_vs_reports_ratios_on_the_same_tokens(cli, tiny_models, tmp_path):
    other = tmp_path / "bf16"
    assert cli("convert", "dtype", tiny_models["llama"], "-o", other, "--no-eval").exit_code == 0
    result = cli(
        "eval", tiny_models["llama"], "--vs", other, "--max-tokens", "512", "--seq-len", "64", "--format", "json"
    )
    data = json.loads(result.stdout)
    assert data["model"]["tokens"] == data["vs"]["tokens"]
    assert math.isclose(data["ratio"]["perplexity"], data["model"]["perplexity"] / data["vs"]["perplexity"])
    assert math.isclose(data["ratio"]["size_bytes"], 2.0, rel_tol=0.02), "fp32 vs bf16 weights"
    assert abs(data["ratio"]["perplexity"] - 1) < 0.01


def test_eval_vs_refuses_a_different_tokenizer(cli, tiny_models, tmp_path):
    other = tmp_path / "gpt2-other-tok"
    import shutil

    shutil.copytree(tiny_models["gpt2"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[1:3]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    result = cli("eval", tiny_models["llama"], "--vs", other, "--max-tokens", "512", "--seq-len", "64")
    assert result.exit_code == 2 and "different inputs" in result.stderr and "another tokenizer" in result.stderr


def _recipe(tmp_path, model, gates: str) -> str:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {model}\noutput: {tmp_path / 'out'}\nstages:\n  - convert.dtype: {{dtype: bf16}}\n"
        f"eval: {{vs_source: true}}\ngates: {gates}\n"
    )
    return str(recipe)


def test_violated_gate_exits_5_and_records_it(cli, tiny_llama, tmp_path):
    result = cli(
        "run",
        _recipe(tmp_path, tiny_llama, "{max_perplexity: 1.5, max_perplexity_increase_pct: 50}"),
        *QUICK_EVAL,
        "--format",
        "json",
    )
    assert result.exit_code == 5
    assert "max_perplexity" in result.stderr and "off by" in result.stderr
    manifest = json.loads((tmp_path / "out" / "streamify.json").read_text())
    gates = {g["gate"]: g for g in manifest["gates"]}
    assert gates["max_perplexity"]["passed"] is False and gates["max_perplexity_increase_pct"]["passed"] is True
    payload = json.loads(result.stdout)  # the error, and the results the run still produced
    assert payload["exit_code"] == 5 and payload["result"]["eval"]["perplexity"] > 1.5
    assert [g["passed"] for g in payload["result"]["gates"]] == [False, True]


def test_failed_gate_still_shows_the_eval_and_every_gate(cli, tiny_llama, tmp_path):
    """Human output on exit 5: the eval table and each gate, passed or failed, then the failure."""
    gates = "{max_perplexity: 1.5, max_perplexity_increase_pct: 50}"
    result = cli("run", _recipe(tmp_path, tiny_llama, gates), *QUICK_EVAL)
    assert result.exit_code == 5
    assert "perplexity" in result.stdout and "tokens scored" in result.stdout
    assert "gate max_perplexity" in result.stdout and "FAILED" in result.stdout.upper()
    assert "gate max_perplexity_increase_pct" in result.stdout and "passed" in result.stdout
    assert "quality gate failed" in result.stderr


def test_held_gate_exits_0(cli, tiny_llama, tmp_path):
    result = cli(
        "run",
        _recipe(tmp_path, tiny_llama, "{max_perplexity_increase_pct: 5, max_size_bytes: 10000000}"),
        *QUICK_EVAL,
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    increase = 100 * (summary["eval"]["perplexity"] / summary["eval_source"]["perplexity"] - 1)
    (gate,) = [g for g in summary["gates"] if g["gate"] == "max_perplexity_increase_pct"]
    assert math.isclose(gate["value"], increase) and gate["passed"]
    assert summary["eval_source"]["load_seconds"] > 0  # the source was loaded; the artifact never was
    assert "load_seconds" not in summary["eval"] and None not in summary["eval"].values()
