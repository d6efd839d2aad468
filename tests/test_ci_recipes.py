"""Recipes for CI: stage cache and resume after a kill, batch runs, gates relative to the source, the plan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from streamify.io.source import resolve_source
from streamify.model.patterns import select_modules
from streamify.pipeline.cache import stage_keys
from streamify.pipeline.recipe import validate_recipe

HEAL_RECIPE = """\
model: {model}
seed: 3
stages:
  - convert.dtype: {{dtype: fp32}}
  - convert.streaming:
      sinks: 2
      window: 16
      heal: {{steps: {steps}, seq_len: 48, grad_accum: 1, warmup_steps: 2, checkpoint_every: 5, eval_blocks: 1}}
"""


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor in a folder's safetensors files."""
    digests = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = handle.get_tensor(name).contiguous()
                digests[name] = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def _streamify(args: list[str], cache: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "STREAMIFY_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "streamify", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killed_run_resumes_mid_stage_to_the_same_artifact(tmp_path, tiny_llama):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(HEAL_RECIPE.format(model=tiny_llama, steps=40))
    whole = _streamify(["run", recipe, f"output={tmp_path / 'whole'}", "--format", "json"], tmp_path / "cache-a")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err

    cache = tmp_path / "cache-b"
    out = tmp_path / "resumed"
    killed = _streamify(["run", recipe, f"output={out}"], cache)
    deadline = time.monotonic() + 300
    while not list(cache.glob("train/*/step-*/streamify_train.json")):
        assert killed.poll() is None, "the run ended before its first training checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not out.exists(), "a killed run must not leave an artifact that looks whole"
    assert list(cache.glob("stages/*/stage.json")), "the finished first stage should be in the cache"

    again = _streamify(["run", recipe, f"output={out}", "--format", "json"], cache)
    stdout, log = again.communicate(timeout=600)
    assert again.returncode == 0, log
    assert "stage 1/2: convert.dtype: reused from the stage cache" in log
    assert "training: resumed at step" in log
    summary = json.loads(stdout)
    assert [s["cache"] for s in summary["stages"]] == ["reused", "stored"]
    assert summary["stages"][1]["metrics"]["heal_resumed_from_step"] > 0
    assert tensor_digests(out) == tensor_digests(tmp_path / "whole")


def test_rerun_reuses_the_cache_and_no_cache_does_not(cli, tiny_llama, tmp_path):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(HEAL_RECIPE.format(model=tiny_llama, steps=6))

    def run(out: str, *extra: str) -> dict:
        result = cli("run", recipe, f"output={tmp_path / out}", "--format", "json", *extra)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    first = run("a")
    assert [s["cache"] for s in first["stages"]] == ["stored", "stored"]
    plan = json.loads(cli("run", recipe, f"output={tmp_path / 'c'}", "--dry-run", "--format", "json").stdout)
    assert [s["cache"] for s in plan["plan"]["stages"]] == ["hit", "hit"]
    second = run("b")
    assert [s["cache"] for s in second["stages"]] == ["reused", "reused"]
    assert second["stages"][1]["metrics"] == first["stages"][1]["metrics"]
    uncached = run("c", "--no-cache")
    assert [s["cache"] for s in uncached["stages"]] == ["off", "off"]
    assert tensor_digests(tmp_path / "a") == tensor_digests(tmp_path / "b") == tensor_digests(tmp_path / "c")


def test_cache_key_follows_contents_not_paths(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    recipe = validate_recipe({"model": str(model), "stages": [{"convert.dtype": {"dtype": "bf16"}}]}, "test")
    cpu = torch.device("cpu")
    before = stage_keys(recipe, resolve_source(str(model)), cpu)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert stage_keys(recipe, resolve_source(str(copy)), cpu) == before

    weights = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        weights.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    weights.save_pretrained(model)  # same path, same names, new contents
    assert stage_keys(recipe, resolve_source(str(model)), cpu) != before
    other_data = recipe.model_copy(update={"data": str(tmp_path / "model" / "config.json")})
    assert stage_keys(other_data, resolve_source(str(copy)), cpu) != before


def test_cache_list_and_clean(cli, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    result = cli("convert", "dtype", tiny_llama, "-o", tmp_path / "out", "--no-eval", "--format", "json")
    assert result.exit_code == 0, result.stderr
    listed = json.loads(cli("cache", "list", "--format", "json").stdout)
    (entry,) = listed["entries"]
    assert entry["kind"] == "stages" and entry["stages"] == ["convert.dtype"] and entry["bytes"] > 0
    kept = json.loads(cli("cache", "clean", "--older-than", "1", "--format", "json").stdout)
    assert kept["removed"] == 0
    cleaned = json.loads(cli("cache", "clean", "--format", "json").stdout)
    assert cleaned["removed"] == 1 and cleaned["freed_bytes"] == entry["bytes"]
    assert json.loads(cli("cache", "list", "--format", "json").stdout)["entries"] == []
    assert cli("cache", "clean", "--kind", "nope").exit_code == 2


def test_batch_continues_past_a_broken_model(cli, tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("model: placeholder\nstages:\n  - convert.dtype: {dtype: bf16}\n")
    root = tmp_path / "artifacts"
    models = [str(tiny_models["llama"]), str(broken), str(tiny_models["qwen2"])]
    result = cli("batch", recipe, "--models", *models, "--out-root", root, "--format", "json")
    assert result.exit_code == 3, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads((root / "batch.json").read_text())
    assert [m["status"] for m in report["models"]] == ["ok", "failed", "ok"]
    assert report["ok"] == 2 and report["failed"] == 1 and report["exit_code"] == 3
    failure = report["models"][1]
    assert failure["exit_code"] == 3 and "model.safetensors" in failure["error"] and failure["output"] is None
    for name in (tiny_models["llama"].name, tiny_models["qwen2"].name):
        assert (root / name / "streamify.json").is_file()
    assert not (root / "broken").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary folders left behind"
    assert (root / "logs" / "broken.log").read_text()


def _comparable(report: dict) -> dict:
    """A batch report without what differs between runs (times, folders, logs)."""
    rows = [{k: row[k] for k in ("model", "status", "exit_code")} for row in report["models"]]
    return {"models": rows, **{k: report[k] for k in ("recipe", "overrides", "ok", "failed", "exit_code")}}


def test_sharded_batches_merge_into_the_unsharded_report(cli, tiny_models, tmp_path):
    """Three models (the middle one broken) in two shards, each to its own folder as on two machines, merged:
    the same models, statuses and exit code as one batch over all three."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("model: placeholder\nstages:\n  - convert.dtype: {dtype: bf16}\neval: null\n")
    models = ["--models", str(tiny_models["llama"]), "--models", str(broken), "--models", str(tiny_models["qwen2"])]
    whole = cli("batch", recipe, *models, "--out-root", tmp_path / "whole", "--jobs", "3", "--format", "json")
    shards = [tmp_path / "machine1", tmp_path / "machine2"]
    first = cli("batch", recipe, *models, "--out-root", shards[0], "--shard", "1/2", "--jobs", "2", "--format", "json")
    second = cli("batch", recipe, *models, "--out-root", shards[1], "--shard", "2/2", "--format", "json")
    assert (first.exit_code, second.exit_code) == (3, 0), first.stderr + second.stderr
    assert [m["model"] for m in json.loads(first.stdout)["models"]] == [str(tiny_models["llama"]), str(broken)]
    assert (shards[1] / "batch-shard-2-of-2.json").is_file() and not (shards[1] / "batch.json").exists()
    merged = cli("batch", "merge", *shards, "--out-root", tmp_path / "merged", "--format", "json")
    assert merged.exit_code == whole.exit_code == 3, merged.stderr
    assert _comparable(json.loads(merged.stdout)) == _comparable(json.loads(whole.stdout))
    assert json.loads((tmp_path / "merged" / "batch.json").read_text())["merged_from"]

    missing = cli("batch", "merge", shards[0], "--out-root", tmp_path / "m2")
    assert missing.exit_code == 2 and "missing [2]" in missing.stderr
    twice = cli("batch", "merge", shards[0], shards[0], shards[1], "--out-root", tmp_path / "m3")
    assert twice.exit_code == 2 and "given twice [1]" in twice.stderr
    assert cli("batch", recipe, *models, "--shard", "3/2").exit_code == 2
    assert "no shard reports given" in cli("batch", "merge").stderr
    empty = cli("batch", recipe, "--models", str(tiny_models["llama"]), "--shard", "2/2", "--out-root", tmp_path / "e")
    assert empty.exit_code == 2 and "no models fall in this shard" in empty.stderr


def test_shard_slices_cover_the_list_once_in_order():
    from streamify.pipeline.batch import shard_slice

    models = [f"m{i}" for i in range(7)]
    for count in range(1, 9):
        slices = [shard_slice(models, (index, count)) for index in range(1, count + 1)]
        assert [m for part in slices for m in part] == models
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_batch_refuses_two_models_with_one_output_name(cli, tiny_llama, tmp_path):
    twin = tmp_path / "elsewhere" / tiny_llama.name
    shutil.copytree(tiny_llama, twin)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: placeholder\nstages: []\n")
    result = cli("batch", recipe, "--models", tiny_llama, twin, "--out-root", tmp_path / "out")
    assert result.exit_code == 2 and "would both write" in result.stderr


def _gated(tmp_path, model, stages: str, eval_: str, gates: str) -> Path:
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(f"model: {model}\nstages:\n{stages}\neval: {eval_}\ngates: {gates}\n")
    return recipe


@pytest.mark.parametrize(("limit", "code"), [(40, 0), (60, 5)])
def test_size_reduction_gate(cli, tiny_llama, tmp_path, limit, code):
    recipe = _gated(
        tmp_path,
        tiny_llama,
        "  - convert.dtype: {dtype: bf16}",
        "{max_tokens: 128, seq_len: 64}",
        f"{{min_size_reduction_pct: {limit}}}",
    )
    result = cli("run", recipe, f"output={tmp_path / 'out'}", "--format", "json")
    assert result.exit_code == code, result.stderr
    (gate,) = json.loads((tmp_path / "out" / "streamify.json").read_text())["gates"]
    assert gate["gate"] == "min_size_reduction_pct" and 49 < gate["value"] < 51
    assert gate["passed"] == (code == 0)


def test_equivalence_gate(cli, tiny_llama, tmp_path):
    stages = "  - convert.streaming: {sinks: 2, window: 8}"
    recipe = _gated(
        tmp_path,
        tiny_llama,
        stages,
        "{max_tokens: 128, seq_len: 64, equivalence: true}",
        "{max_equivalence_abs_diff: 1.0e-4}",
    )
    result = cli("run", recipe, f"output={tmp_path / 'out'}", "--format", "json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["eval"]["equivalence.max_abs_diff"] <= 1e-4
    assert summary["gates"][0]["gate"] == "max_equivalence_abs_diff" and summary["gates"][0]["passed"]

    missing = _gated(tmp_path, tiny_llama, stages, "{}", "{max_equivalence_abs_diff: 1.0e-4}")
    result = cli("recipe", "validate", missing)
    assert result.exit_code == 2 and "eval.equivalence" in result.stderr


def test_plan_shows_lora_pattern_matches_and_refuses_unmatched(cli, tiny_llama, tmp_path):
    heal = "{steps: 4, lora_targets: ['re:.*mlp.*'], lora_ignore: [down_proj]}"
    out = tmp_path / "out"
    recipe = tmp_path / "plan.yaml"
    recipe.write_text(f"model: {tiny_llama}\nstages:\n  - convert.streaming: {{sinks: 2, window: 8, heal: {heal}}}\n")
    result = cli("run", recipe, f"output={out}", "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    (stage,) = json.loads(result.stdout)["plan"]["stages"]
    assert stage["modules"]["lora_targets"]["re:.*mlp.*"]["count"] == 4 * 5  # mlp, gate/up/down_proj, act_fn per block
    assert stage["modules"]["lora_modules"] == 4 * 2  # gate_proj and up_proj of 4 blocks
    assert stage["estimate"]["peak_memory_bytes"] > 2 * 4 * json.loads(result.stdout)["plan"]["params"]
    bad = recipe.read_text().replace("down_proj", "down_prj")
    recipe.write_text(bad)
    result = cli("run", recipe, f"output={out}", "--dry-run")
    assert result.exit_code == 2 and "'down_prj' matches no module" in result.stderr
    assert not out.exists()


def test_select_modules_patterns(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    default = select_modules(model, None, [], "test")
    assert "lm_head" not in default and len(default) == 4 * 7
    by_class = select_modules(model, ["LlamaAttention"], ["re:.*\\.o_proj"], "test")
    assert by_class == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qkv"]
    exact = select_modules(model, ["model.layers.2.mlp.up_proj"], [], "test")
    assert exact == ["model.layers.2.mlp.up_proj"]
