"""Stage subcommands are made from the stages' Params: the CLI and recipe forms cannot drift apart."""

from __future__ import annotations

import pytest
import typer
import yaml

from streamify.cli.app import app
from streamify.cli.stage_commands import stage_fields
from streamify.pipeline.registry import all_stages

STAGES = sorted(all_stages())
REQUIRED = {"prune.depth": (["--remove", "1"], {"remove": 1})}  # one of remove, keep_ratio, blocks must be given


def _command(stage_name: str):
    group, action = stage_name.split(".")
    root = typer.main.get_command(app)
    ctx = root.make_context("streamify", [group, "--help"], resilient_parsing=True)
    sub = root.get_command(ctx, group)
    return sub.get_command(ctx, action.replace("_", "-"))


@pytest.mark.parametrize("name", STAGES)
def test_every_param_has_an_option(name):
    flags = {opt for param in _command(name).params for opt in (*param.opts, *param.secondary_opts)}
    for field, _ in stage_fields(all_stages()[name].params):
        assert set(field.flag.split("/")) <= flags, (name, field.flag)


@pytest.mark.parametrize("name", STAGES)
def test_cli_defaults_are_the_recipe_defaults(name, cli, tiny_llama, tiny_kinds, tmp_path):
    """With no stage option given (but a required one), the saved recipe holds exactly the stage's own defaults."""
    group, action = name.split(".")
    saved = tmp_path / "r.yaml"
    args, values = REQUIRED.get(name, ([], {}))
    kinds = all_stages()[name].kinds
    model = (
        tiny_llama
        if kinds == "all" or "causal-lm" in kinds
        else tiny_kinds["denoiser"]
        if "denoiser" in kinds
        else tiny_kinds["speech-seq2seq"]
    )
    result = cli(
        group, action.replace("_", "-"), model, "-o", tmp_path / "out", *args, "--dry-run", "--save-recipe", saved
    )
    assert result.exit_code == 0, result.stderr
    (entry,) = yaml.safe_load(saved.read_text())["stages"]
    assert entry == {name: all_stages()[name].params(**values).model_dump(mode="json")}


def test_options_reach_the_recipe(cli, tiny_llama, tmp_path):
    """Nested fields (heal.*), booleans, lists and unions arrive typed as the recipe has them."""
    saved = tmp_path / "r.yaml"
    args = ["--window", "16", "--heal-steps", "3", "--heal-lora-targets", "mlp", "--heal-lora-targets", "self_attn"]
    result = cli("convert", "streaming", tiny_llama, "-o", tmp_path / "o", *args, "--dry-run", "--save-recipe", saved)
    assert result.exit_code == 0, result.stderr
    params = yaml.safe_load(saved.read_text())["stages"][0]["convert.streaming"]
    assert params["window"] == 16 and params["heal"]["steps"] == 3
    assert params["heal"]["lora_targets"] == ["mlp", "self_attn"]
    args = ["--group-size", "32", "--asym", "--no-act-order", "--weights-format", "gguf", "--gguf-type", "Q4_1"]
    result = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "q", *args, "--dry-run", "--save-recipe", saved)
    assert result.exit_code == 0, result.stderr
    params = yaml.safe_load(saved.read_text())["stages"][0]["quantize.int4"]
    assert params["group_size"] == 32 and params["symmetric"] is False and params["act_order"] is False
    assert params["weights_format"] == "gguf"
    args = ["--blocks", "1,2", "--dry-run", "--save-recipe", saved]
    result = cli("prune", "depth", tiny_llama, "-o", tmp_path / "p", *args)
    assert result.exit_code == 0 and yaml.safe_load(saved.read_text())["stages"][0]["prune.depth"]["blocks"] == [1, 2]


@pytest.mark.parametrize(
    ("yaml_text", "message", "fix"),
    [
        (
            "stages:\n  - quantize.int5: {}\n",
            "did you mean 'quantize.int4'?",
            "valid stages: convert.causal, convert.causal_video, convert.dtype",
        ),
        ("stages:\n  - quantize.int4: {group_sise: 32}\n", "did you mean 'group_size'?", "valid keys of quantize.int4"),
        ("stages: []\neval: {max_tokes: 64}\n", "did you mean 'max_tokens'?", "valid eval keys: data, max_tokens"),
        ("stages: []\nmodle: x\n", "did you mean 'model'?", "valid top-level keys: model"),
    ],
)
def test_typos_get_a_suggestion_and_the_keys_of_their_level(cli, tiny_llama, tmp_path, yaml_text, message, fix):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\n{yaml_text}" if "modle" not in yaml_text else yaml_text)
    result = cli("recipe", "validate", recipe)
    assert result.exit_code == 2 and message in result.stderr and fix in result.stderr, result.stderr


def test_plan_checks_params_against_the_model_before_loading(cli, tiny_llama, tmp_path):
    """A group size that does not fit fails at --dry-run; the default (auto) is resolved and shown in the plan."""
    refused = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "q", "--group-size", "128", "--dry-run")
    assert refused.exit_code == 2 and "group size 128 does not divide the input size 32" in refused.stderr
    plan = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "q", "--dry-run")
    assert plan.exit_code == 0 and "resolved for this model: group_size=32, targets=28" in plan.stdout
    out_of_range = cli("convert", "streaming", tiny_llama, "-o", tmp_path / "s", "--full-layers", "7", "--dry-run")
    assert out_of_range.exit_code == 2 and "out of range" in out_of_range.stderr
