"""Bad input gets its documented exit code, a message naming the problem, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from streamify.errors import ExitCode


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".streamify-tmp" in p.name]


def _convert(cli, model, out, *extra):
    return cli("convert", "dtype", model, "-o", out, "--no-eval", *extra)


def test_missing_path_exits_3_naming_it_as_a_process(tmp_path):
    """The console script itself: exit code and message, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "streamify", "inspect", "/does/not/exist"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == ExitCode.INPUT == 3
    assert "/does/not/exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("refusal", ["file-size limit", "no space"])
def test_a_write_the_file_system_refuses_exits_4_and_publishes_nothing(tiny_llama, tmp_path, refusal):
    """A disk that fills up (ENOSPC from an OSError) or a file-size limit (RLIMIT_FSIZE: safetensors' Rust
    writer fails with "os error 27") is a resource problem, exit 4, not an internal error with a traceback;
    nothing is published and no temporary folder is left. The console script, as a process."""
    import resource

    out = tmp_path / "out"
    command = [sys.executable, "-m", "streamify", "convert", "dtype", str(tiny_llama), "-o", str(out), "--no-eval"]
    if refusal == "no space":  # the OSError a full disk raises, from every text file written (config.json, ...)
        patch = (
            "import errno, pathlib, sys, streamify.cli.app as app\n"
            "def full(*args, **kwargs): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "pathlib.Path.write_text = full\nsys.argv = sys.argv[1:]\napp.main()"
        )
        command = [sys.executable, "-c", patch, *command[2:]]
    limit = 20_000 if refusal == "file-size limit" else resource.RLIM_INFINITY

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=cap)
    assert proc.returncode == ExitCode.RESOURCES, proc.stderr
    assert "a file could not be written" in proc.stderr and "Traceback" not in proc.stderr
    assert ("os error 27" if refusal == "file-size limit" else "No space left on device") in proc.stderr
    _assert_nothing_written(tmp_path, out)


def test_truncated_safetensors(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tmp_path / "out"
    result = _convert(cli, model, out)
    assert result.exit_code == 3
    assert "model.safetensors" in result.stderr and "truncated" in result.stderr
    _assert_nothing_written(tmp_path, out)


def test_config_that_is_not_json(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    (model / "config.json").write_text("{not json")
    result = _convert(cli, model, tmp_path / "out")
    assert result.exit_code == 3 and "config.json" in result.stderr and "not valid JSON" in result.stderr
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_architecture(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no-such-arch"
    (model / "config.json").write_text(json.dumps(config))
    result = cli("inspect", model)
    assert result.exit_code == 3 and "no-such-arch" in result.stderr and "unsupported architecture" in result.stderr


def test_pickled_weights_refused_without_allow_pickle(cli, tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = _copy(tiny_llama, tmp_path)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    result = _convert(cli, model, tmp_path / "out")
    assert result.exit_code == 3 and "pytorch_model.bin" in result.stderr and "--allow-pickle" in result.stderr
    assert _convert(cli, model, tmp_path / "out", "--allow-pickle").exit_code == 0


def test_missing_weights_are_an_error_not_random_init(cli, tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_llama, tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    result = _convert(cli, model, tmp_path / "out")
    assert result.exit_code == 3 and "model.layers.0.mlp.up_proj.weight" in result.stderr


def test_existing_output_needs_overwrite(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _convert(cli, tiny_llama, out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and str(out) in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_never_writes_into_the_input(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    before = sorted(p.name for p in model.iterdir())
    result = _convert(cli, model, model / "converted", "--overwrite")
    assert result.exit_code == 2 and "inside the input" in result.stderr
    assert sorted(p.name for p in model.iterdir()) == before


def test_malformed_yaml(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\nstages:\n  - convert.dtype: {dtype: bf16\n")
    result = cli("run", recipe)
    assert result.exit_code == 2 and "malformed YAML" in result.stderr and "line" in result.stderr


def test_unknown_stage_lists_valid_ones(cli, tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\noutput: {tmp_path / 'out'}\nstages:\n  - convert.dtyp: {{}}\n")
    result = cli("run", recipe)
    assert result.exit_code == 2 and "unknown stage 'convert.dtyp'" in result.stderr
    assert "convert.dtype" in result.stderr
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("stages:\n  - convert.dtype: {dtyp: bf16}\n", "unknown key 'dtyp'"),
        ("stages:\n  - convert.dtype: {dtype: int3}\n", "'dtype'"),
        ("outptu: x\n", "unknown key 'outptu'"),
    ],
)
def test_unknown_or_invalid_keys_name_the_key(cli, tiny_llama, tmp_path, yaml_text, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\n{yaml_text}")
    result = cli("recipe", "validate", recipe)
    assert result.exit_code == 2 and expected in result.stderr and "valid" in result.stderr


def test_json_format_reports_the_error_on_stdout(cli):
    result = cli("inspect", "/does/not/exist", "--format", "json")
    payload = json.loads(result.stdout)
    assert result.exit_code == 3 and payload["exit_code"] == 3 and "/does/not/exist" in payload["error"]


def test_hub_id_offline_is_a_clear_error(cli):
    result = cli("inspect", "some-org/some-model")
    assert result.exit_code == 3 and "some-org/some-model" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_device_that_is_not_here(cli, tiny_llama, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("convert", "dtype", tiny_llama, "-o", tmp_path / "out", "--device", "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr


def test_write_refused_follows_the_chain_as_tracebacks_show_it():
    """The refusal is found behind the error a library wraps it in, not behind ``raise ... from None``, and a
    cycle of causes ends."""
    import errno

    from streamify.errors import write_refused

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("saving failed")  # noqa: B904 (the implicit context is the point)
    except RuntimeError as wrapped:
        assert write_refused(wrapped) is full
    try:
        try:
            raise full
        except OSError:
            raise KeyError("unrelated") from None
    except KeyError as suppressed:
        assert write_refused(suppressed) is None
    first, second = ValueError("a"), ValueError("b")
    first.__cause__, second.__cause__ = second, first
    assert write_refused(first) is None
    assert write_refused(RuntimeError("I/O error: File too large (os error 27)")) is not None
    assert write_refused(OSError(errno.ENOENT, "No such file or directory")) is None


def test_save_torch_under_a_file_size_limit_raises_the_os_error_and_leaves_no_file(tmp_path):
    """torch.save to a path hides the errno in a RuntimeError; save_torch (the block-wise and resume states)
    lets the OSError through, so the CLI reports exit 4, and removes its temporary file."""
    code = (
        "import resource, sys, torch\nfrom pathlib import Path\nfrom streamify.io.atomic import save_torch\n"
        "from streamify.errors import write_refused\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n    save_torch(torch.zeros(10_000), Path(sys.argv[1]) / 'state.pt')\n"
        "except Exception as exc:\n    print(write_refused(exc).errno)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "27", proc.stderr  # EFBIG
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_run_exits_130_and_publishes_nothing(cli, tiny_llama, tmp_path, monkeypatch):
    """Ctrl-C while the artifact is being written: exit 130 with a message (not click's "Aborted!" and exit 1,
    which the README keeps for bugs), no output folder, no temporary folder left."""
    import streamify.pipeline.runner as runner

    def interrupted(checkpoint, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_model_files", interrupted)
    out = tmp_path / "out"
    result = _convert(cli, tiny_llama, out)
    assert result.exit_code == ExitCode.INTERRUPTED == 130 and "interrupted (Ctrl-C)" in result.stderr
    assert "Aborted" not in result.stderr
    _assert_nothing_written(tmp_path, out)
