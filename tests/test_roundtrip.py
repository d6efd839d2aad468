"""Load -> stage -> artifact -> transformers reload gives the in-memory model's logits exactly."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import streamify
from streamify.converters.dtype import DtypeParams, convert_dtype
from streamify.io.load import load_checkpoint
from streamify.pipeline.registry import StageContext

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def _ids(vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_artifact_reloads_with_identical_logits(cli, tiny_models, tmp_path, arch, dtype):
    out = tmp_path / "out"
    result = cli("convert", "dtype", tiny_models[arch], "-o", out, "--dtype", dtype, "--no-eval", "--format", "quiet")
    assert result.exit_code == 0, result.stderr

    # the same stage applied in memory
    checkpoint = load_checkpoint(str(tiny_models[arch]))
    convert_dtype(checkpoint, DtypeParams(dtype=dtype), StageContext(device=torch.device("cpu"), seed=0, data=""))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == checkpoint.model.dtype
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, checkpoint.model(_ids()).logits)


def test_artifact_folder_contents(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--dtype", "bf16", "--format", "quiet").exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "streamify.json", "recipe.yaml", "README.md"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    manifest_bytes = (out / "streamify.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    assert manifest["format_version"] == 2 and manifest["streamify_version"] == streamify.__version__
    source_file = tiny_llama / "model.safetensors"
    assert manifest["source"]["files"] == [
        {
            "path": str(source_file),
            "sha256": hashlib.sha256(source_file.read_bytes()).hexdigest(),
            "size": source_file.stat().st_size,
        }
    ]
    (stage,) = manifest["stages"]
    assert stage["name"] == "convert.dtype" and stage["params"] == {
        "dtype": "bf16",
        "blockwise": "auto",
        "max_shard_size": "5GB",
    }
    assert stage["metrics"] == {"dtype_before": ["fp32"], "dtype_after": "bf16"}
    assert stage["seconds"] >= 0
    assert manifest["eval"]["perplexity"] > 1 and manifest["eval"]["params"] > 0
    assert manifest["seed"] == 0 and manifest["packages"]["torch"] == torch.__version__

    with safe_open(out / "model.safetensors", "pt") as fh:
        meta = fh.metadata()
    assert meta["streamify_version"] == streamify.__version__
    # the stamp is the sha256 of the manifest without its `files` record, which hashes the stamped files
    core = {k: v for k, v in manifest.items() if k != "files"}
    assert meta["streamify_manifest_sha256"] == hashlib.sha256((json.dumps(core, indent=2) + "\n").encode()).hexdigest()
    for name in ("model.safetensors", "config.json", "recipe.yaml", "tokenizer.json"):
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert "README.md" not in manifest["files"] and "streamify.json" not in manifest["files"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "convert.dtype" in front["tags"]
    assert "| perplexity |" in card

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"] == str(tiny_llama) and recipe["stages"] == [
        {"convert.dtype": {"dtype": "bf16", "blockwise": "auto", "max_shard_size": "5GB"}}
    ]


def test_saved_recipe_reruns_to_the_same_tensors(cli, tiny_llama, tmp_path):
    recipe_file = tmp_path / "r.yaml"
    first, second = tmp_path / "a", tmp_path / "b"
    args = ("convert", "dtype", tiny_llama, "-o", first, "--dtype", "fp16", "--no-eval", "--format", "quiet")
    assert cli(*args, "--save-recipe", recipe_file).exit_code == 0
    assert cli("run", recipe_file, f"output={second}", "--format", "quiet").exit_code == 0
    with safe_open(first / "model.safetensors", "pt") as a, safe_open(second / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in sorted(a.keys()):
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_streamify_load_reads_an_artifact_and_keeps_history(cli, tiny_llama, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli("convert", "dtype", tiny_llama, "-o", first, "--dtype", "bf16", "--no-eval").exit_code == 0
    model, tokenizer = streamify.load(str(first))
    assert model.dtype == torch.bfloat16 and tokenizer is not None and not model.training
    assert cli("convert", "dtype", first, "-o", second, "--dtype", "fp32", "--no-eval").exit_code == 0
    manifest = json.loads((second / "streamify.json").read_text())
    assert [s["name"] for s in manifest["history"]] == ["convert.dtype"]
    assert manifest["history"][0]["params"]["dtype"] == "bf16"


def test_overwrite_replaces_an_existing_artifact(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--dtype", "bf16", "--no-eval").exit_code == 0
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--dtype", "fp16", "--no-eval", "--overwrite").exit_code == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
