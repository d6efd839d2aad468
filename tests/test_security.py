"""Hostile and careless input: crafted artifacts, links, outputs that hold the input, races, corrupt bytes.

One test (or a parametrized group) per case of the safety issue; each failed on
the code before the fix. A crafted artifact is the attack surface of a tool
that converts files from strangers, so the attacks are built as an attacker
would: valid files with consistent checksums where the attacker can recompute them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from safetensors import safe_open

from streamify.codec.container import CONTAINER_NAME, read_index, write_container
from streamify.errors import ExitCode
from streamify.io.artifact import output_lock, pending_folder
from streamify.io.atomic import publish, temp_sibling

DEAD_PID = 4194304 + 4242  # above Linux's largest pid_max: never a live process


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def coded(cli, tiny_llama, tmp_path):
    """An entropy-coded tiny Llama (coded embeddings and head, raw norms and small matrices)."""
    out = tmp_path / "coded"
    assert cli("quantize", "entropy", tiny_llama, "-o", out, "--no-eval").exit_code == 0
    return out


def _rewrite_container(folder, edit) -> None:
    """Rewrite the container with ``edit(tensors, meta)`` applied, its sha256 recomputed as an attacker can."""
    path = folder / CONTAINER_NAME
    meta = read_index(path)
    with safe_open(path, "pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    edit(tensors, meta)
    write_container(path, tensors, meta["tensors"], meta["files"])


def _flip_tensor_byte(path, name, position=0):
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    data = bytearray(path.read_bytes())
    data[8 + header_len + header[name]["data_offsets"][0] + position] ^= 0x40
    path.write_bytes(bytes(data))


# 1. file names in a container's index are plain names inside the folder, or refused before anything is written
EVIL_NAMES = ["../../escaped.safetensors", "ABSOLUTE", "sub/inner.safetensors", ".hidden.safetensors"]


@pytest.mark.parametrize("evil", EVIL_NAMES)
def test_container_file_names_cannot_leave_the_folder(cli, coded, tmp_path, evil):
    target = tmp_path / "victim" / "escaped.safetensors"
    target.parent.mkdir()
    name = str(target) if evil == "ABSOLUTE" else evil

    def rename(tensors, meta):
        meta["files"] = {name: meta["files"]["model.safetensors"]}
        for entry in meta["tensors"].values():
            entry["file"] = name

    _rewrite_container(coded, rename)
    out = tmp_path / "decoded"
    result = cli("quantize", "decode", coded, "-o", out)
    assert result.exit_code == ExitCode.INPUT, result.stderr
    assert "plain .safetensors file name" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists() and not out.exists()
    assert not list(tmp_path.rglob("escaped.safetensors")) and not list(tmp_path.rglob("inner.safetensors"))
    assert cli("eval", coded, "--max-tokens", "64", "--seq-len", "32").exit_code == ExitCode.INPUT


# 2. links that leave the folder are refused wherever side files are read or copied
def test_artifact_link_to_a_secret_is_not_copied(cli, coded, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:$6$hash")
    (coded / "notes.txt").symlink_to(secret)
    out = tmp_path / "decoded"
    result = cli("quantize", "decode", coded, "-o", out)
    assert result.exit_code == ExitCode.INPUT and "outside the model folder" in result.stderr
    assert not out.exists()


def test_model_folder_link_to_a_secret_is_refused(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:$6$hash")
    (model / "vocab.txt").symlink_to(secret)
    out = tmp_path / "out"
    result = cli("convert", "dtype", model, "-o", out, "--no-eval")
    assert result.exit_code == ExitCode.INPUT and "vocab.txt" in result.stderr
    assert not out.exists()


def test_links_inside_the_folder_are_fine(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    (model / "config-link.json").symlink_to(model / "config.json")
    assert cli("convert", "dtype", model, "-o", tmp_path / "out", "--no-eval").exit_code == 0


# 3. the output is never the input, inside it, or around it; --overwrite replaces only an artifact
def test_overwrite_into_the_inputs_parent_is_refused(cli, tiny_llama, tmp_path):
    parent = tmp_path / "P"
    model = _copy(tiny_llama, parent, "tiny")
    (parent / "thesis.tex").write_text("years of work")
    result = cli("convert", "dtype", model, "-o", parent, "--dtype", "bf16", "--overwrite", "--no-eval")
    assert result.exit_code == ExitCode.USAGE and "contains the input" in result.stderr
    assert (model / "model.safetensors").is_file() and (parent / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_only_an_artifact(cli, tiny_llama, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep me")
    result = cli("convert", "dtype", tiny_llama, "-o", mine, "--overwrite", "--no-eval")
    assert result.exit_code == ExitCode.USAGE and "only a streamify artifact" in result.stderr
    assert (mine / "notes.md").read_text() == "keep me"
    artifact = tmp_path / "artifact"
    assert cli("convert", "dtype", tiny_llama, "-o", artifact, "--no-eval").exit_code == 0
    again = cli("convert", "dtype", tiny_llama, "-o", artifact, "--dtype", "fp16", "--overwrite", "--no-eval")
    assert again.exit_code == 0 and json.loads((artifact / "config.json").read_text())["dtype"] == "float16"


# 4. one run at a time per output, and the final rename re-checks what is there
def test_second_run_on_a_locked_output_fails_at_once_naming_the_first(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    with output_lock(out.resolve()):
        result = cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval")
    assert result.exit_code == ExitCode.USAGE and f"PID {os.getpid()}" in result.stderr
    assert not out.exists()
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval").exit_code == 0  # released
    assert not list(tmp_path.glob(".out.streamify-lock"))


def test_folder_made_at_the_output_during_a_run_survives(cli, tiny_llama, tmp_path, monkeypatch):
    import streamify.pipeline.runner as runner

    out = tmp_path / "out"
    save = runner.save_model_files

    def user_creates_the_output(checkpoint, folder):
        out.mkdir()
        (out / "results.csv").write_text("made by the user meanwhile")
        save(checkpoint, folder)

    monkeypatch.setattr(runner, "save_model_files", user_creates_the_output)
    result = cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval")
    assert result.exit_code == ExitCode.USAGE and "not empty" in result.stderr
    assert (out / "results.csv").read_text() == "made by the user meanwhile"
    assert not [p for p in tmp_path.iterdir() if ".streamify-" in p.name]


# 5. concurrent first use of a cache entry: the first writer wins, the second takes its entry
def test_publish_keeps_the_winner(tmp_path):
    final = tmp_path / "entry"
    first, second = temp_sibling(final), temp_sibling(final)
    (first / "data").write_text("first")
    (second / "data").write_text("second")
    assert publish(first, final) is True
    assert publish(second, final) is False
    assert (final / "data").read_text() == "first" and not second.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_gguf_dequantized_by_another_process_meanwhile(tmp_path, monkeypatch):
    """The other process publishes the cache folder while this one is still writing: no error, one entry."""
    import streamify.io.load as load
    from streamify.io.source import resolve_source

    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    source = resolve_source(_tiny_gguf(tmp_path))
    original = load.AutoTokenizer.from_pretrained
    raced = []

    def other_process_finishes_first(*args, **kwargs):
        if not raced:
            raced.append(True)
            load._materialize_gguf(source, load.SILENT)
        return original(*args, **kwargs)

    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", other_process_finishes_first)
    folder = load._materialize_gguf(resolve_source(str(source.path)), load.SILENT)
    assert raced and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def _tiny_gguf(tmp_path):
    """A tiny Llama GGUF (F32) with a tokenizer, written with the gguf package."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", *[chr(ord("a") + i) for i in range(13)]]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3, *[1] * 13])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (16, 8),
        "output_norm.weight": (8,),
        "output.weight": (16, 8),
        "blk.0.attn_norm.weight": (8,),
        "blk.0.ffn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (8, 8),
        "blk.0.attn_v.weight": (8, 8),
        "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_gate.weight": (16, 8),
        "blk.0.ffn_up.weight": (16, 8),
        "blk.0.ffn_down.weight": (8, 16),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# 6. every stored byte of a container has a checksum: raw tensors too
def test_flipped_byte_in_a_raw_tensor_is_detected(cli, coded, tmp_path):
    name = "model.layers.0.input_layernorm.weight"
    assert read_index(coded / CONTAINER_NAME)["tensors"][name]["storage"] == "raw"
    _flip_tensor_byte(coded / CONTAINER_NAME, name, position=2)
    for args in (["eval", coded], ["eval", coded, "--lazy"]):
        result = cli(*args, "--max-tokens", "64", "--seq-len", "32")
        assert result.exit_code == ExitCode.INPUT and name in result.stderr and "checksum" in result.stderr
    decoded = cli("quantize", "decode", coded, "-o", tmp_path / "decoded")
    assert decoded.exit_code == ExitCode.INPUT and not (tmp_path / "decoded").exists()


def test_edited_index_is_detected(cli, coded, tmp_path):
    path = coded / CONTAINER_NAME
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    key = b'\\"count\\":'  # the index is a JSON string inside the header: its quotes are escaped
    at = data.index(key, 8, 8 + header_len) + len(key)
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # still valid JSON, a different chunk count
    path.write_bytes(bytes(data))
    result = cli("quantize", "decode", coded, "-o", tmp_path / "decoded")
    assert result.exit_code == ExitCode.INPUT and "sha256" in result.stderr


# 7. plain artifacts record every file's sha256; verify and --verify find a flipped byte
def test_verify_names_the_damaged_file(cli, tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval").exit_code == 0
    ok = cli("verify", out, "--format", "json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["files"] >= 4
    _flip_tensor_byte(out / "model.safetensors", "model.layers.1.mlp.up_proj.weight", position=10)
    bad = cli("verify", out)
    assert bad.exit_code == ExitCode.INPUT and "model.safetensors" in bad.stderr and "sha256" in bad.stderr
    assert cli("eval", out, "--max-tokens", "64", "--seq-len", "32").exit_code == 0  # not asked to verify
    asked = cli("eval", out, "--verify", "--max-tokens", "64", "--seq-len", "32")
    assert asked.exit_code == ExitCode.INPUT and "model.safetensors" in asked.stderr
    recipe = cli("convert", "dtype", out, "-o", tmp_path / "again", "--no-eval")  # recipes verify by default
    assert recipe.exit_code == ExitCode.INPUT and "model.safetensors" in recipe.stderr


def test_verify_refuses_an_edited_manifest(cli, tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval").exit_code == 0
    manifest = json.loads((out / "streamify.json").read_text())
    manifest["seed"] = 1234
    (out / "streamify.json").write_text(json.dumps(manifest, indent=2) + "\n")
    result = cli("verify", out)
    assert result.exit_code == ExitCode.INPUT and "manifest was edited" in result.stderr


# 8. the index is checked against the config's tensors and the stored bytes before anything is written
def test_container_missing_a_tensor_is_refused(cli, coded, tmp_path):
    def drop_head(tensors, meta):
        del tensors["lm_head.weight"], meta["tensors"]["lm_head.weight"]

    _rewrite_container(coded, drop_head)
    out = tmp_path / "decoded"
    result = cli("quantize", "decode", coded, "-o", out)
    assert result.exit_code == ExitCode.INPUT and "lm_head.weight" in result.stderr and not out.exists()


def test_index_that_says_raw_for_coded_data_is_refused(cli, coded, tmp_path):
    def mislabel(tensors, meta):
        meta["tensors"]["lm_head.weight"] = {"file": "model.safetensors", "storage": "raw"}

    _rewrite_container(coded, mislabel)
    for args in (["quantize", "decode", coded, "-o", tmp_path / "decoded"], ["eval", coded, "--max-tokens", "64"]):
        result = cli(*args)
        assert result.exit_code == ExitCode.INPUT and "lm_head.weight" in result.stderr, result.stderr
    assert not (tmp_path / "decoded").exists()


# 9. safetensors headers that parse but do not add up
def _header_cases():
    def no_offsets(h):
        h["model.norm.weight"]["offsets"] = h["model.norm.weight"].pop("data_offsets")

    def wrong_shape(h):
        h["model.norm.weight"]["shape"] = [h["model.norm.weight"]["shape"][0] * 2]

    def negative(h):
        h["model.norm.weight"]["shape"] = [-32]

    def overlap(h):
        a, b = h["model.norm.weight"]["data_offsets"], h["lm_head.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [b[0], b[0] + (a[1] - a[0])]

    return {"no data_offsets": no_offsets, "shape vs bytes": wrong_shape, "negative": negative, "overlap": overlap}


@pytest.mark.parametrize("case", list(_header_cases()))
def test_inconsistent_safetensors_header(cli, tiny_llama, tmp_path, case):
    model = _copy(tiny_llama, tmp_path)
    path = model / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    _header_cases()[case](header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    result = cli("convert", "dtype", model, "-o", tmp_path / "out", "--no-eval")
    assert result.exit_code == ExitCode.INPUT, result.stderr
    assert "model.safetensors" in result.stderr and "Traceback" not in result.stderr


# 10 and 14. configs that are not objects, or whose fields have the wrong type or value
@pytest.mark.parametrize(
    "edit",
    [lambda c: [], lambda c: "x", lambda c: {**c, "hidden_size": "abc"}, lambda c: {**c, "num_hidden_layers": -1}],
    ids=["list", "string", "hidden_size abc", "layers -1"],
)
def test_malformed_config(cli, tiny_llama, tmp_path, edit):
    model = _copy(tiny_llama, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(edit(config)))
    result = cli("convert", "dtype", model, "-o", tmp_path / "out", "--no-eval")
    assert result.exit_code == ExitCode.INPUT and "config.json" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "above report" not in result.stderr


def test_weights_of_the_wrong_shape_are_named(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    result = cli("convert", "dtype", model, "-o", tmp_path / "out", "--no-eval")
    assert result.exit_code == ExitCode.INPUT and "mlp.up_proj.weight" in result.stderr
    assert "above report" not in result.stderr


# 11. a pickle that torch's weights-only loader rejects is reported as refused, not as a bug
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_is_refused_with_the_reason(cli, tiny_llama, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model)
    torch.save({"model.embed_tokens.weight": _Payload()}, model / "pytorch_model.bin", pickle_module=pickle)
    result = cli("convert", "dtype", model, "-o", tmp_path / "out", "--no-eval", "--allow-pickle")
    assert result.exit_code == ExitCode.INPUT, result.stderr
    assert "refused as unsafe" in result.stderr and "internal error" not in result.stderr


# 12. numbers out of range on the command line are usage errors
@pytest.mark.parametrize("args", [["--max-tokens", "0"], ["--seq-len", "0"], ["--seq-len", "1"]])
def test_eval_ranges(cli, tiny_llama, args):
    result = cli("eval", tiny_llama, *args)
    assert result.exit_code == ExitCode.USAGE and args[0] in result.output


# 13. stage params are validated with the recipe, naming the key (recipe) or the flag (command line)
@pytest.mark.parametrize("params", ["{window: -8}", "{window: 0}", "{sinks: 64, window: 16}"])
def test_streaming_params_are_checked_when_the_recipe_is(cli, tiny_llama, tmp_path, params):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama}\noutput: {tmp_path / 'out'}\nstages:\n  - convert.streaming: {params}\n")
    for args in (["recipe", "validate", recipe], ["run", recipe, "--dry-run"]):
        result = cli(*args)
        assert result.exit_code == ExitCode.USAGE and "stages.0 (convert.streaming)" in result.stderr
        assert "window" in result.stderr


def test_cli_errors_name_the_flag(cli, tiny_llama, tmp_path):
    result = cli("convert", "streaming", tiny_llama, "-o", tmp_path / "out", "--window", "0", "--no-eval")
    assert result.exit_code == ExitCode.USAGE and "'--window'" in result.stderr and "stages.0" not in result.stderr


# 15. temporary folders of killed runs are cleaned by the next run on that output and by `cache clean`
def test_stale_temp_output_is_removed_by_the_next_run(cli, tiny_llama, tmp_path):
    stale = tmp_path / f".out.streamify-tmp-{DEAD_PID}-x1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".out.streamify-tmp-{os.getpid()}-x2"  # a run still going: kept
    live.mkdir()
    assert cli("convert", "dtype", tiny_llama, "-o", tmp_path / "out", "--no-eval").exit_code == 0
    assert not stale.exists() and live.exists()


def test_cache_clean_finds_temp_outputs_of_killed_runs(cli, tmp_path):
    stale = tmp_path / "elsewhere" / f".out.streamify-tmp-{DEAD_PID}-x1"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 2048)
    pending_folder().mkdir(parents=True, exist_ok=True)
    (pending_folder() / "test-record.json").write_text(json.dumps({"pid": DEAD_PID, "path": str(stale)}))
    result = cli("cache", "clean", "--kind", "train", "--format", "json")
    assert result.exit_code == 0 and not stale.exists()
    assert json.loads(result.stdout)["stale_temp_bytes"] >= 2048


# 16. an output where free space cannot be measured gets a sensible answer
def test_output_on_proc_is_a_usage_error(cli, tiny_llama):
    result = cli("convert", "dtype", tiny_llama, "-o", "/proc/streamify-out", "--no-eval")
    assert result.exit_code == ExitCode.USAGE and "0.0 GiB" not in result.stderr
    assert "/proc/streamify-out" in result.stderr


def test_no_third_party_progress_bars_when_stdout_is_not_a_terminal(tmp_path):
    """transformers' GGUF dequantization bar stays quiet in a pipe (tqdm reads TQDM_DISABLE at import)."""
    import subprocess
    import sys

    gguf = _tiny_gguf(tmp_path)
    env = {**os.environ, "STREAMIFY_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TQDM_DISABLE", None)
    args = [sys.executable, "-m", "streamify", "eval", gguf, "--max-tokens", "16", "--seq-len", "8"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert "dequantizing tiny.gguf" in done.stderr, done.stderr  # the GGUF was converted in this run
    assert "Converting and de-quantizing" not in done.stderr and "it/s" not in done.stderr


# Found by a second read of the change (each reproduced first)
def test_lock_file_planted_as_a_link_is_refused_and_its_target_kept(cli, tiny_llama, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    (tmp_path / ".out.streamify-lock").symlink_to(victim)
    result = cli("convert", "dtype", tiny_llama, "-o", tmp_path / "out", "--no-eval")
    assert result.exit_code == ExitCode.USAGE and "link" in result.stderr
    assert victim.read_text() == "precious data" and not (tmp_path / "out").exists()


def test_file_appearing_at_the_output_during_a_run_is_not_moved_aside(cli, tiny_llama, tmp_path, monkeypatch):
    import streamify.pipeline.runner as runner

    out = tmp_path / "out"
    save = runner.save_model_files

    def user_writes_a_file_there(checkpoint, folder):
        out.write_text("a file of the user's")
        save(checkpoint, folder)

    monkeypatch.setattr(runner, "save_model_files", user_writes_a_file_there)
    result = cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval")
    assert result.exit_code == ExitCode.USAGE and out.read_text() == "a file of the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_verify_refuses_unrecorded_files_and_links_out(cli, tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    assert cli("convert", "dtype", tiny_llama, "-o", out, "--no-eval").exit_code == 0
    (out / "modeling_evil.py").write_text("import os")
    added = cli("verify", out)
    assert added.exit_code == ExitCode.INPUT and "modeling_evil.py" in added.stderr
    (out / "modeling_evil.py").unlink()
    (tmp_path / "secret").write_text("root:x")
    (out / "x.bin").symlink_to(tmp_path / "secret")
    linked = cli("verify", out)
    assert linked.exit_code == ExitCode.INPUT and "outside the model folder" in linked.stderr


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: meta["tensors"]["model.norm.weight"].update(file=[]),
        lambda meta: meta["tensors"]["lm_head.weight"].update(dtype=["BF16"]),
        lambda meta: meta["tensors"]["model.norm.weight"].update(shape=[True] * 32),
        lambda meta: meta["files"].update({"model.safetensors": "not a mapping"}),
    ],
    ids=["file is a list", "dtype is a list", "shape of booleans", "file entry not a mapping"],
)
def test_malformed_index_values_are_input_errors(cli, coded, tmp_path, damage):
    _rewrite_container(coded, lambda tensors, meta: damage(meta))
    result = cli("quantize", "decode", coded, "-o", tmp_path / "decoded")
    assert result.exit_code == ExitCode.INPUT and "Traceback" not in result.stderr, result.stderr


def test_deeply_nested_header_is_an_input_error(cli, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path)
    nested = ("[" * 100_000 + "]" * 100_000).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(nested)) + nested)
    result = cli("convert", "dtype", model, "-o", tmp_path / "out", "--no-eval")
    assert result.exit_code == ExitCode.INPUT and "model.safetensors" in result.stderr


def test_sibling_with_an_impossible_pid_is_left_alone(cli, tiny_llama, tmp_path):
    odd = tmp_path / ".out.streamify-tmp-99999999999999999999"
    odd.mkdir()
    assert cli("convert", "dtype", tiny_llama, "-o", tmp_path / "out", "--no-eval").exit_code == 0
    assert odd.exists()


def test_publish_replaces_an_incomplete_leftover(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "partial").write_text("left by a crash")
    fresh = temp_sibling(final)
    (fresh / "done").write_text("whole")
    assert publish(fresh, final, complete=lambda f: (f / "done").is_file()) is True
    assert (final / "done").is_file() and not (final / "partial").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
