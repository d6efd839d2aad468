"""INT4 block by block from the safetensors files: the same artifact as in memory, the plan's choice, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import streamify.pipeline.plan as plan_module
import streamify.quantize.int4.compressed as compressed
from streamify.io.artifact import output_lock

CALIBRATION = ("--samples", "4", "--seq-len", "64")


def quantize(cli, model: Path, out: Path, *options: str) -> dict:
    result = cli("quantize", "int4", model, "-o", out, *CALIBRATION, "--format", "json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def planned(cli, model: Path, out: Path, *options: str) -> dict:
    return quantize(cli, model, out, "--dry-run", *options)["plan"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


@pytest.mark.parametrize(("arch", "method"), [("llama", "gptq"), ("llama", "awq"), ("gemma", "rtn")])
def test_block_by_block_writes_the_in_memory_artifact(cli, tiny_models, tmp_path, monkeypatch, arch, method):
    """Read, calibrated and written one block at a time, a model gives the in-memory path's files exactly (names,
    dtypes, values, config), here split into shards by a 16 KiB limit, which transformers loads through the index.
    Gemma ties its head to the embedding: written once, as transformers writes it."""
    monkeypatch.setattr(compressed, "SHARD_BYTES", 16 * 1024)
    if arch == "llama":  # a class that keeps a module in fp32 (as Wan's does): kept and named on both paths
        monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules", ["norm"])
    model = tiny_models[arch]
    memory = quantize(cli, model, tmp_path / "memory", "--method", method, "--blockwise", "off", "--no-eval")
    disk = quantize(cli, model, tmp_path / "disk", "--method", method, "--blockwise", "on", "--no-eval")
    assert "path" not in memory["stages"][0]["metrics"] and disk["stages"][0]["metrics"]["path"] == "block-wise"
    kept = [sorted(run["stages"][0]["metrics"].get("kept_fp32", [])) for run in (disk, memory)]
    assert kept[0] == kept[1] == ["model.norm.weight"] * (arch == "llama"), kept
    assert len(list((tmp_path / "disk").glob("model-*-of-*.safetensors"))) > 2
    index = json.loads((tmp_path / "disk" / compressed.INDEX_NAME).read_text())
    ours, theirs = tensors(tmp_path / "disk"), tensors(tmp_path / "memory")
    assert sorted(index["weight_map"]) == sorted(ours) == sorted(theirs)
    assert all(ours[n].dtype == theirs[n].dtype and torch.equal(ours[n], theirs[n]) for n in ours)
    assert ("lm_head.weight" in ours) != (arch == "gemma")
    config = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    ids = torch.arange(5, 37)[None]
    with torch.no_grad():
        sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()(ids).logits
        whole = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").eval()(ids).logits
    assert torch.isfinite(sharded).all() and torch.equal(sharded, whole)


def test_a_block_wise_run_needs_the_artifacts_size_free_where_the_cache_keeps_its_progress(
    cli, tiny_llama, tmp_path, monkeypatch
):
    """A block-wise quantize int4 keeps its shards under the cache until it ends: the plan names that folder (not
    with --no-cache, not in memory), and a run is refused (exit 4, before any weight is read, nothing published)
    when the cache is on another file system without the artifact's size free; on the output's file system the
    shards are renamed into the artifact, so the output's check is the one that counts."""
    from streamify.io.cache import cache_root

    plan = planned(cli, tiny_llama, tmp_path / "a", "--no-eval", "--blockwise", "on")
    assert Path(plan["path"]["progress_dir"]) == cache_root()
    assert (
        "progress_dir"
        not in planned(cli, tiny_llama, tmp_path / "a", "--no-eval", "--blockwise", "on", "--no-cache")["path"]
    )
    assert "progress_dir" not in planned(cli, tiny_llama, tmp_path / "a", "--no-eval", "--blockwise", "off")["path"]
    real = shutil.disk_usage
    full = plan["estimate"]["disk_bytes"] - 1  # one byte short of the artifact, except where the output goes
    monkeypatch.setattr(
        plan_module.shutil, "disk_usage", lambda p: real(p) if Path(p) == tmp_path else real(p)._replace(free=full)
    )
    monkeypatch.setattr(plan_module, "_same_file_system", lambda first, second: False)
    options = ("-o", tmp_path / "out", *CALIBRATION, "--no-eval", "--blockwise", "on")
    refused = cli("quantize", "int4", tiny_llama, *options)
    assert refused.exit_code == 4, refused.output
    assert f"{cache_root()}: a block-wise run keeps its progress there until it ends" in refused.stderr
    assert "STREAMIFY_CACHE_DIR" in refused.stderr and not (tmp_path / "out").exists()
    assert cli("quantize", "int4", tiny_llama, *options, "--no-cache").exit_code == 0
    monkeypatch.setattr(plan_module, "_same_file_system", lambda first, second: True)
    shutil.rmtree(tmp_path / "out")
    assert cli("quantize", "int4", tiny_llama, *options).exit_code == 0


def test_plan_goes_block_by_block_when_the_model_does_not_fit(cli, tiny_llama, tmp_path, monkeypatch):
    """auto: in memory while the run fits; block by block when it does not and nothing rules it out (the
    run then takes that path); in memory with the reason when the eval rules it out, and the run is refused."""
    fits = planned(cli, tiny_llama, tmp_path / "a", "--no-eval")
    assert not fits["path"]["blockwise"] and fits["path"]["why"].startswith("in memory: the run fits")
    in_memory = fits["estimate"]["peak_memory_bytes"]
    asked = planned(cli, tiny_llama, tmp_path / "a", "--no-eval", "--blockwise", "on")
    assert asked["path"]["blockwise"] and asked["path"]["why"] == "block by block, as asked (blockwise: on)"
    block_wise = asked["estimate"]["peak_memory_bytes"]
    assert block_wise < in_memory
    monkeypatch.setattr(plan_module, "available_memory_bytes", lambda: (block_wise + in_memory) // 2)
    tight = planned(cli, tiny_llama, tmp_path / "a", "--no-eval")
    assert tight["path"]["blockwise"] and "in memory the run needs about" in tight["path"]["why"]
    assert tight["estimate"]["peak_memory_bytes"] == block_wise
    done = quantize(cli, tiny_llama, tmp_path / "a", "--no-eval", "--method", "rtn")
    assert done["stages"][0]["metrics"]["path"] == "block-wise"
    ruled_out = planned(cli, tiny_llama, tmp_path / "b")
    assert not ruled_out["path"]["blockwise"] and "the eval needs the whole model" in ruled_out["path"]["why"]
    refused = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "b", *CALIBRATION)
    assert refused.exit_code == 4 and "block by block is ruled out" in refused.output
    assert not (tmp_path / "b").exists()


def test_block_by_block_refusals(cli, tiny_llama, tmp_path):
    """blockwise on where it cannot run: a clear message (exit 2), nothing written."""
    with_eval = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "o", "--blockwise", "on")
    assert with_eval.exit_code == 2 and "the eval needs the whole model in memory" in with_eval.output
    gguf = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "o", "--blockwise", "on", "--weights-format", "gguf")
    assert gguf.exit_code == 2 and "GGUF artifacts are written from the model in memory" in gguf.output
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    options = ("--blockwise", "on", "--no-eval", "--allow-pickle")
    refused = cli("quantize", "int4", pickled, "-o", tmp_path / "o", *options)
    assert refused.exit_code == 2 and "the weights are not in safetensors files" in refused.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("arch", "shard"), [("llama", "5GB"), ("llama", "20KB"), ("gemma", "5GB")])
def test_dtype_conversion_block_by_block_writes_the_in_memory_files(
    cli, tiny_models, tmp_path, monkeypatch, arch, shard
):
    """convert dtype --blockwise on casts and writes one block at a time: the in-memory path's tensors (names,
    dtypes, values; a module the class keeps in fp32 stays fp32; gemma's tied head once) and config; sharded
    by --max-shard-size, transformers loads it through the index."""
    if arch == "llama":
        monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules", ["norm"])
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        args = ["--dtype", "bf16", "--blockwise", mode, "--max-shard-size", shard, "--no-eval", "--format", "json"]
        result = cli("convert", "dtype", tiny_models[arch], "-o", out, *args)
        assert result.exit_code == 0, result.stderr
        assert (json.loads(result.stdout)["stages"][0]["metrics"].get("path") == "block-wise") == (mode == "on")
        runs[mode] = out
    memory, disk = tensors(runs["off"]), tensors(runs["on"])
    assert sorted(disk) == sorted(memory)
    for name, value in memory.items():
        assert disk[name].dtype == value.dtype and torch.equal(disk[name], value), name
    if arch == "llama":
        assert disk["model.norm.weight"].dtype == torch.float32 and disk["lm_head.weight"].dtype == torch.bfloat16
    on, off = (json.loads((runs[m] / "config.json").read_text()) for m in ("on", "off"))
    assert on == off
    assert (len(list(runs["on"].glob("model-*.safetensors"))) > 1) == (shard == "20KB")
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(runs["off"])(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(runs["on"])(ids).logits, expected)


def test_the_memory_check_holds_the_estimate_against_ram_for_cpu_runs_only(tmp_path):
    from streamify.errors import ResourceError

    estimate = {"peak_memory_bytes": 10 * 2**30, "available_memory_bytes": 2**30, "disk_bytes": 0}
    plan = {"model": "m", "estimate": estimate, "processes": {"on_this_machine": 1}, "path": {"why": None}}
    with pytest.raises(ResourceError, match=r"needs about 10\.0 GiB of memory, 1\.0 GiB is available"):
        plan_module.check_fits(plan, tmp_path / "out", device="cpu")
    plan_module.check_fits(plan, tmp_path / "out", device="cuda:0")  # its memory is not this machine's RAM


@pytest.mark.parametrize(
    ("arch", "choice", "shard"),
    [
        ("llama", ["--remove", "2", "--metric", "angular"], "20KB"),
        ("gemma", ["--remove", "2", "--metric", "bi", "--dtype", "bf16"], "5GB"),
        ("llama", ["--blocks", "0,2"], "5GB"),
    ],
)
def test_depth_pruning_block_by_block_writes_the_in_memory_artifact(cli, tiny_models, tmp_path, arch, choice, shard):
    """prune depth --blockwise on scores the blocks one at a time from the files (the same scores, bit for bit,
    so the same blocks go; or the blocks given), writes the kept ones renumbered (the in-memory artifact's
    tensors and config, its dtype included, sharded by --max-shard-size) and transformers loads it with the
    same logits."""
    runs = {}
    for mode in ("off", "on"):
        args = [*choice, "--samples", "3", "--seq-len", "32", "--blockwise", mode]
        result = cli(
            "prune", "depth", tiny_models[arch], "-o", tmp_path / mode, *args, "--max-shard-size", shard,
            "--no-eval", "--format", "json",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        runs[mode] = json.loads(result.stdout)["stages"][0]["metrics"]
    assert runs["on"]["path"] == "block-wise" and "path" not in runs["off"]
    assert runs["on"]["removed"] == runs["off"]["removed"] and runs["on"]["scores"] == runs["off"]["scores"]
    assert runs["on"]["blocks_after"] == runs["off"]["blocks_after"] == runs["off"]["blocks_before"] - 2
    memory, disk = tensors(tmp_path / "off"), tensors(tmp_path / "on")
    assert sorted(disk) == sorted(memory)
    assert all(disk[n].dtype == memory[n].dtype and torch.equal(disk[n], memory[n]) for n in memory)
    on, off = (json.loads((tmp_path / m / "config.json").read_text()) for m in ("on", "off"))
    assert on == off and on["num_hidden_layers"] == runs["off"]["blocks_after"]
    assert (len(list((tmp_path / "on").glob("model-*.safetensors"))) > 1) == (shard == "20KB")
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "off")(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "on")(ids).logits, expected)


def test_block_by_block_is_ruled_out_for_blocks_that_attend_differently(cli, tiny_models, tmp_path):
    """A Qwen2 with sliding-window layers above max_window_layers: each kind of layer gets its own mask from the
    model, which block by block (block 0's mask for every block) would not give; refused with the reason."""
    model = tmp_path / "qwen2-sliding"
    shutil.copytree(tiny_models["qwen2"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
    (model / "config.json").write_text(json.dumps(config))
    for command in (["prune", "depth", "--remove", "1"], ["quantize", "int4", "--method", "rtn"]):
        result = cli(*command[:2], model, "-o", tmp_path / "o", *command[2:], "--blockwise", "on", "--no-eval")
        assert result.exit_code == 2 and "its blocks attend in different ways" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_depth_pruning_block_by_block_refuses_what_needs_the_whole_model(cli, tiny_llama, tmp_path):
    for options, reason in (
        (("--metric", "loss"), "the loss metric runs the whole model"),
        (("--heal-steps", "2"), "healing trains the whole model"),
        (("--replace", "--metric", "streamline"), "a replacement block trains on the whole model"),
    ):
        result = cli("prune", "depth", tiny_llama, "-o", tmp_path / "o", "--remove", "1", "--blockwise", "on", *options)
        assert result.exit_code == 2 and reason in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_a_killed_block_by_block_run_resumes_to_the_same_artifact(cli, tiny_llama, tmp_path, monkeypatch):
    """GPTQ block by block keeps its shards, the tensors waiting for the next one and the next block's inputs
    (here after every block); killed while writing block 2, a second run resumes after block 2 and writes the
    uninterrupted run's files, shard for shard."""
    import streamify.quantize.int4.calibrate as calibrate

    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "CHECKPOINT_EVERY", 1)
    monkeypatch.setattr(compressed, "SHARD_BYTES", 16 * 1024)
    options = ("--method", "gptq", "--blockwise", "on", "--no-eval")
    quantize(cli, tiny_llama, tmp_path / "whole", *options)
    add = compressed.PackedShards.add
    calls = []

    def killed_at_block_2(self, tensors, quantized):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it, after blocks 0 and 1
        return add(self, tensors, quantized)

    monkeypatch.setattr(compressed.PackedShards, "add", killed_at_block_2)
    stopped = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "resumed", *CALIBRATION, *options)
    assert stopped.exit_code != 0 and len(calls) == 3 and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(compressed.PackedShards, "add", add)
    (progress,) = (tmp_path / "cache" / "calibrate").glob("blockwise-*")
    with output_lock(progress):  # as another run of the same model, settings and data would hold it
        busy = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "resumed", *CALIBRATION, *options)
    assert busy.exit_code == 2 and "is writing this block-wise progress" in busy.stderr and "--no-cache" in busy.stderr
    other = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "fp16", *CALIBRATION, *options, "--dtype", "fp16")
    assert other.exit_code == 0 and "resumed" not in other.stderr  # loaded otherwise: not the same run
    result = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "resumed", *CALIBRATION, *options)
    assert result.exit_code == 0, result.stderr
    assert "calibration: resumed after block 2/4" in result.stderr
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert shards == sorted(p.name for p in resumed.glob("*.safetensors")) and len(shards) > 2
    for name in shards:
        mine, theirs = load_file(resumed / name), load_file(whole / name)
        assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert not list((tmp_path / "cache" / "calibrate").glob("blockwise-*"))  # the progress is gone when done


def test_a_run_that_fails_before_its_first_block_releases_the_progress(cli, tiny_llama, tmp_path, monkeypatch):
    """The progress lock is released whatever stops the run once it holds it (here the shard writer failing to
    start, as on a full disk): the next run in the same process is not refused as a concurrent one."""
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    options = ("--method", "rtn", "--blockwise", "on", "--no-eval")
    start = compressed.PackedShards.__init__

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compressed.PackedShards, "__init__", disk_full)
    failed = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "first", *CALIBRATION, *options)
    assert failed.exit_code != 0  # (the result, kept, holds the failed run's traceback and checkpoint)
    monkeypatch.setattr(compressed.PackedShards, "__init__", start)
    second = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "second", *CALIBRATION, *options)
    assert second.exit_code == 0, second.stderr


def test_a_run_killed_while_its_shards_move_into_the_artifact_starts_over(cli, tiny_llama, tmp_path, monkeypatch):
    """Killed after the first shard moved into the artifact: no state is left to resume from, so the next run
    starts over (rather than resume from shards that are gone) and writes the same files."""
    import streamify.quantize.int4.calibrate as calibrate
    import streamify.quantize.int4.compressed as packed

    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "CHECKPOINT_EVERY", 1)  # a state is kept after every block
    monkeypatch.setattr(compressed, "SHARD_BYTES", 16 * 1024)
    options = ("--method", "rtn", "--blockwise", "on", "--no-eval")
    quantize(cli, tiny_llama, tmp_path / "whole", *options)
    move, moved = packed.shutil.move, []

    def killed_after_one(source, target):
        moved.append(target)
        if len(moved) == 2:
            raise KeyboardInterrupt
        return move(source, target)

    monkeypatch.setattr(packed.shutil, "move", killed_after_one)
    assert cli("quantize", "int4", tiny_llama, "-o", tmp_path / "again", *options).exit_code != 0
    monkeypatch.setattr(packed.shutil, "move", move)
    result = cli("quantize", "int4", tiny_llama, "-o", tmp_path / "again", *options)
    assert result.exit_code == 0, result.stderr
    assert "resumed" not in result.stderr
    assert tensors(tmp_path / "again").keys() == tensors(tmp_path / "whole").keys()
    assert all(torch.equal(a, b) for a, b in zip(tensors(tmp_path / "again").values(),
                                                 tensors(tmp_path / "whole").values(), strict=True))  # fmt: skip
