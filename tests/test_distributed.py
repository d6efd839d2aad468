"""Training on several processes: DDP through accelerate, launched by torchrun or accelerate launch (gloo on CPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from streamify.distill.trainer import TrainParams, train

BIN = Path(sys.executable).parent
PARAMS = {"steps": 6, "lr": 1e-2, "grad_accum": 2, "warmup_steps": 1, "checkpoint_every": 2}

# The test's training, as a script a launcher starts: a seeded model and data, optionally dying after step 4
# (both processes at the same micro-batch, after the step-4 checkpoint); the main process saves the result.
TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from accelerate import PartialState
from streamify.distill.trainer import TrainParams, train

out, checkpoints, die_after_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = PartialState(cpu=True)
params = TrainParams(**json.loads(sys.argv[4]))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
blocks = torch.randint(0, 50, (12, 8), generator=torch.Generator().manual_seed(0))
calls = [0]

def loss_fn(batch):
    calls[0] += 1
    if die_after_step and calls[0] > die_after_step * params.grad_accum // state.num_processes:
        raise SystemExit(3)
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

result = train(model, blocks, loss_fn, params, seed=3, checkpoint_dir=Path(checkpoints))
if state.is_main_process:
    torch.save({"weights": model.state_dict(), "losses": result.losses, "resumed_from": result.resumed_from}, out)
"""


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _torchrun(processes: int, *args) -> subprocess.CompletedProcess:
    command = [BIN / "torchrun", "--standalone", f"--nproc_per_node={processes}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(a) for a in command], capture_output=True, text=True, timeout=600, env=env)


def _launched_run(recipe: Path, output: Path, cache: Path) -> list[dict]:
    """`accelerate launch -m streamify run RECIPE` on 2 CPU processes with the stage cache in ``cache``: the JSON
    summaries the processes printed (it must succeed)."""
    launch = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port()]
    command = [*launch, "-m", "streamify", "run", recipe, f"output={output}", "--format", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMIFY_CACHE_DIR": str(cache)}
    done = subprocess.run([str(a) for a in command], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(part) for part in done.stdout.replace("}\n{", "}\n\x00{").split("\x00")]


def _reference() -> tuple[dict, list[float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    blocks = torch.randint(0, 50, (12, 8), generator=torch.Generator().manual_seed(0))

    def loss_fn(batch):
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    result = train(model, blocks, loss_fn, TrainParams(**PARAMS), seed=3)
    return model.state_dict(), result.losses


def _assert_same(result: dict, weights: dict, losses: list[float]) -> None:
    """fp32 bound: DDP sums the two processes' gradients in another order than one process accumulates them."""
    assert result["losses"] == losses or max(abs(a - b) for a, b in zip(result["losses"], losses, strict=True)) < 1e-6
    for name, value in weights.items():
        assert torch.allclose(result["weights"][name], value, atol=1e-6), name


def test_two_processes_train_and_resume_across_process_counts_as_one(tmp_path):
    """A 2-process run killed after its step-4 checkpoint resumes on 1 process, and a 1-process one on 2, to the
    uninterrupted 1-process run's loss curve and weights (same global batch)."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    weights, losses = _reference()
    params = json.dumps(PARAMS)

    for first, then, name in ((2, 1, "a"), (1, 2, "b")):
        checkpoints = tmp_path / f"ckpt-{name}"
        killed = _torchrun(first, script, tmp_path / "unused.pt", checkpoints, 4, params)
        assert killed.returncode != 0
        assert [p.name for p in checkpoints.glob("step-*/streamify_train.json")] == ["streamify_train.json"]
        assert json.loads(next(checkpoints.glob("step-*/streamify_train.json")).read_text())["step"] == 4
        resumed = _torchrun(then, script, tmp_path / f"{name}.pt", checkpoints, 0, params)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        result = torch.load(tmp_path / f"{name}.pt")
        assert result["resumed_from"] == 4
        _assert_same(result, weights, losses)
        assert not checkpoints.exists()


HEAL_RECIPE = """\
model: {model}
seed: 3
stages:
  - convert.streaming:
      sinks: 2
      window: 16
      heal: {{steps: 4, seq_len: 48, grad_accum: 2, warmup_steps: 1, eval_blocks: 1}}
"""


def test_recipe_runs_unchanged_under_accelerate_launch(tmp_path, tiny_llama, cli):
    """`accelerate launch -m streamify run RECIPE` on 2 processes heals to the 1-process artifact (same loss
    curve, weights within fp32 summation order); only the main process writes."""
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(HEAL_RECIPE.format(model=tiny_llama))
    one = cli("run", recipe, f"output={tmp_path / 'one'}", "--format", "json")
    assert one.exit_code == 0, one.stderr
    summaries = _launched_run(recipe, tmp_path / "two", tmp_path / "cache")
    main = next(s for s in summaries if "output" in s)
    assert [s["process"] for s in summaries if "process" in s] == [1]
    first = json.loads(one.stdout)["stages"][0]["metrics"]["heal_losses"]
    second = main["stages"][0]["metrics"]["heal_losses"]
    assert max(abs(a - b) for a, b in zip(first, second, strict=True)) < 1e-6
    ours, theirs = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.allclose(theirs[name], value, atol=1e-6), name


def test_every_stage_that_trains_is_counted():
    """Under a launcher the other processes run up to the last stage that trains; a training stage not counted
    would leave the main process waiting for them in DDP's setup. Every stage whose params train (a ``steps``
    or a ``heal`` field) is here, and counts exactly when it has steps."""
    from streamify.pipeline.registry import all_stages, trains

    training = {
        "convert.streaming": ({"heal": {"steps": 2}}, {}),
        "prune.depth": ({"remove": 1, "heal": {"steps": 2}}, {"remove": 1}),
        "convert.causal": ({"steps": 2}, {"steps": 0}),
        "distill.heal": ({"steps": 2}, None),  # always trains (steps >= 1)
        "distill.ode_init": ({"steps": 2}, None),
        "distill.self_forcing": ({"steps": 2}, None),
    }
    stages = all_stages()
    assert {n for n, s in stages.items() if {"steps", "heal"} & set(s.params.model_fields)} == set(training)
    for name, (with_steps, without) in training.items():
        stage = stages[name]
        assert trains(stage, stage.params(**with_steps)), name
        if without is not None:
            assert not trains(stage, stage.params(**without)), name


def test_dry_run_under_a_launcher_names_the_strategy_and_refuses_an_unshareable_batch(
    tmp_path, tiny_llama, cli, monkeypatch
):
    """The plan under 2 processes says DDP and that its estimates are per process; grad_accum 3 cannot be
    shared by 2 processes: refused at plan time (exit 2), before any weight is read."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(HEAL_RECIPE.format(model=tiny_llama))
    planned = cli("run", recipe, f"output={tmp_path / 'out'}", "--dry-run", "--format", "json")
    assert planned.exit_code == 0, planned.stderr
    assert "DDP over 2 processes" in json.loads(planned.stdout)["plan"]["processes"]["training"]
    recipe.write_text(HEAL_RECIPE.format(model=tiny_llama).replace("grad_accum: 2", "grad_accum: 3"))
    refused = cli("run", recipe, f"output={tmp_path / 'out'}", "--dry-run")
    assert refused.exit_code == 2 and "multiple of 2" in refused.stderr


ODE_RECIPE = """model: {model}
dtype: fp32
data: builtin:shapes
stages:
  - convert.causal_video: {{chunk_frames: 2}}
  - distill.ode_init: {{samples: 6, heldout_samples: 2, teacher_steps: 4, keep: [0, 2], frames: 4, height: 8,
                       width: 8, steps: 2, grad_accum: 2, warmup_steps: 1}}
"""


def test_ode_trajectories_are_sampled_in_shares_under_a_launcher(tmp_path, cli, monkeypatch):
    """Under 2 processes each samples every other teacher trajectory into the shared cache; the stored set is
    the one a single process samples, file for file."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=128,
    ).save_pretrained(tmp_path / "teacher")  # fmt: skip
    recipe = tmp_path / "ode.yaml"
    recipe.write_text(ODE_RECIPE.format(model=tmp_path / "teacher"))
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "one-cache"))
    one = cli("run", recipe, f"output={tmp_path / 'one'}", "--format", "json")
    assert one.exit_code == 0, one.stderr
    assert json.loads(one.stdout)["stages"][1]["metrics"]["trajectories_sampled_here"] == 8
    main = next(s for s in _launched_run(recipe, tmp_path / "two", tmp_path / "two-cache") if "output" in s)
    assert main["stages"][1]["metrics"]["trajectories_sampled_here"] == 4
    stored = {
        name: sorted((tmp_path / name / "trajectories").glob("*/*/trajectory-*.safetensors"))
        for name in ("one-cache", "two-cache")
    }
    assert len(stored["one-cache"]) == len(stored["two-cache"]) == 8
    for mine, theirs in zip(stored["one-cache"], stored["two-cache"], strict=True):
        assert mine.relative_to(tmp_path / "one-cache") == theirs.relative_to(tmp_path / "two-cache")
        assert torch.equal(load_file(mine)["states"], load_file(theirs)["states"])
