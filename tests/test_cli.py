"""CLI surface: inspect, dry runs that read no weights, recipe commands, output formats."""

from __future__ import annotations

import json

import yaml

from conftest import QUICK_EVAL
from streamify.pipeline.recipe import shipped_recipes


def test_inspect_json(cli, tiny_models):
    for arch, blocks_path in [("llama", "model.layers"), ("gpt2", "transformer.h")]:
        result = cli("inspect", tiny_models[arch], "--format", "json")
        assert result.exit_code == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["blocks"] == 4 and info["block_path"] == blocks_path
        assert info["dtypes"] == {"F32": info["dtypes"]["F32"]} and info["params"] > 0
        assert "convert.dtype" in info["applicable_stages"]
    mistral = json.loads(cli("inspect", tiny_models["mistral"], "--format", "json").stdout)
    assert mistral["attention"] == ["sliding"] * 4
    assert json.loads(cli("inspect", tiny_models["llama"], "--format", "json").stdout)["attention"] == ["full"] * 4


def test_inspect_bert_encoder(cli, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    ).save_pretrained(tmp_path)
    info = json.loads(cli("inspect", tmp_path, "--format", "json").stdout)
    assert info["blocks"] == 3 and info["block_path"] == "encoder.layer"
    assert info["architecture"] == "BertModel"


def test_dry_run_reads_no_weights_and_writes_nothing(cli, tiny_llama, tmp_path, monkeypatch):
    import streamify.pipeline.runner as runner

    def forbidden(*args, **kwargs):
        raise AssertionError("dry run loaded weights")

    monkeypatch.setattr(runner, "load_checkpoint", forbidden)
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))  # an empty stage cache: a miss
    out = tmp_path / "out"
    result = cli("convert", "dtype", tiny_llama, "-o", out, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    (stage,) = plan["stages"]
    assert stage["name"] == "convert.dtype" and stage["params"] == {
        "dtype": "bf16",
        "blockwise": "auto",
        "max_shard_size": "5GB",
    }
    assert stage["cache"] == "miss" and stage["estimate"]["disk_bytes"] == plan["params"] * 2
    assert plan["blocks"] == 4 and plan["estimate"]["peak_memory_bytes"] > 0
    assert plan["estimate"]["disk_bytes"] == plan["params"] * 2
    assert not out.exists()
    human = cli("convert", "dtype", tiny_llama, "-o", out, "--dry-run")
    assert "convert.dtype" in human.stdout and "estimate" in human.stdout


def test_json_output_is_pure_json_and_quiet_is_silent(cli, tiny_llama, tmp_path):
    result = cli("convert", "dtype", tiny_llama, "-o", tmp_path / "a", "--format", "json", "--no-eval")
    summary = json.loads(result.stdout)
    assert summary["output"] == str(tmp_path / "a") and "writing" in result.stderr
    quiet = cli("convert", "dtype", tiny_llama, "-o", tmp_path / "b", "--format", "quiet", "--no-eval")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_recipe_commands(cli, tmp_path):
    listed = json.loads(cli("recipe", "list", "--format", "json").stdout)["recipes"]
    assert "quickstart" in listed
    shown = cli("recipe", "show", "quickstart").stdout
    assert yaml.safe_load(shown)["model"] == "builtin:smollm2-135m"
    for name in shipped_recipes():
        assert cli("recipe", "validate", name).exit_code == 0
    schema = json.loads(cli("recipe", "schema").stdout)
    assert "convert.dtype" in schema["stages"] and "stages" in schema["recipe"]["properties"]


def test_run_with_overrides_and_deleted_eval(cli, tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\nstages:\n  - convert.dtype: {{dtype: bf16}}\neval: {{}}\n")
    out = tmp_path / "out"
    result = cli("run", recipe, f"output={out}", "stages.0.dtype=fp16", "~eval", "--format", "json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["eval"] is None and summary["stages"][0]["params"]["dtype"] == "fp16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert cli("run", recipe, f"output={tmp_path / 'c'}", *QUICK_EVAL).exit_code == 0


def test_long_loops_report_progress_lines_when_not_on_a_terminal(cli, tiny_llama, tmp_path):
    """Calibration (per block) and the eval (per window) write progress lines with an estimate to stderr."""
    args = ["--method", "gptq", "--samples", "2", "--seq-len", "32", "--format", "json"]
    result = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "q", *args)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("streamify: quantizing blocks:")]
    assert [line.split(":")[2].split(",")[0].strip() for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("elapsed, about" in line and "left" in line for line in lines)
    assert "streamify: perplexity: 32/32" in result.stderr
    json.loads(result.stdout)  # stdout stays pure JSON
    quiet = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "q2", "--method", "rtn", "--format", "quiet")
    assert quiet.exit_code == 0 and "streamify:" not in quiet.stderr  # (third-party bars: off in main())


def test_help_in_a_pipe_shows_whole_option_names():
    """Piped, rich would lay help out in 80 columns and cut names such as --calibration-dtype."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    args = [sys.executable, "-m", "streamify", "quantize", "int4", "--help"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "--calibration-dtype" in done.stdout and "…" not in done.stdout
