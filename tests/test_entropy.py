"""Lossless entropy coding: bit-exact round trips, corruption detection, artifacts, lazy decoding."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import streamify
from conftest import build_tiny
from streamify.codec.codec import BYTE_CODEC, CorruptWeightsError, decode_tensor, encode_tensor
from streamify.codec.container import CONTAINER_NAME, code_checkpoint, decode_tensors, read_index, write_container
from streamify.codec.restore import restore_files
from streamify.io.load import load_checkpoint
from streamify.io.safetensors_file import read_header
from streamify.progress import SILENT

_BITS = {2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _special(dtype: torch.dtype) -> torch.Tensor:
    """±0, ±inf, NaNs with different payloads, subnormals, the largest finite value."""
    info = torch.finfo(dtype)
    values = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, info.tiny / 4, -info.tiny / 8, info.max], dtype=torch.float32
    ).to(dtype)
    raw = _bits(values).clone()
    nan = raw[4].item()
    payloads = torch.tensor([nan | 1, nan | 2, -(nan | 3) if dtype != torch.float32 else nan | 0x7F], dtype=raw.dtype)
    return torch.cat([raw, payloads]).view(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("size", [1, 4095, 4096, 10007, 3 * 4096 + 1])
def test_codec_round_trip_is_bit_exact(dtype, size):
    gen = torch.Generator().manual_seed(size)
    tensor = torch.cat([(torch.randn(size, generator=gen) * 0.02).to(dtype), _special(dtype)])
    encoded = encode_tensor(tensor, chunk_elems=4096, threads=2)
    assert len(encoded.index["chunks"]) == math.ceil(tensor.numel() / 4096)
    decoded = decode_tensor("t", encoded.index, encoded.blob, threads=2)
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(_bits(decoded), _bits(tensor))


def test_codec_keeps_shapes_including_empty_and_scalar(tmp_path):
    tensors = {
        "matrix": torch.randn(97, 131).to(torch.bfloat16),
        "empty": torch.empty(0, 5, dtype=torch.float16),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "ints": torch.arange(10, dtype=torch.int64),
        "big": torch.randn(64, 200, dtype=torch.float32),
    }

    def save(folder):
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", "note": "kept"})

    coded = code_checkpoint(save, level=8, chunk_elems=4096, threads=1, progress=SILENT)
    index = coded.index
    assert {n for n, e in index.items() if e["storage"] == "coded"} == {"matrix", "big"}
    coded.write(tmp_path)
    kept = {"format": "pt", "note": "kept"}
    assert read_index(tmp_path / CONTAINER_NAME)["files"] == {"model.safetensors": {"metadata": kept}}
    restored = tmp_path / "restored"
    restored.mkdir()
    (path,) = restore_files(tmp_path / CONTAINER_NAME, restored, config=None)
    with safe_open(path, "pt") as fh:
        assert fh.metadata() == kept
        for name, tensor in tensors.items():
            got = fh.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert (
                got.numpy().tobytes() == tensor.numpy().tobytes()
                if tensor.dtype != torch.bfloat16
                else torch.equal(_bits(got), _bits(tensor))
            )


def test_every_single_byte_corruption_of_a_chunk_is_detected():
    tensor = (torch.randn(3000) * 0.02).to(torch.bfloat16).repeat(2)  # 6000 elements, two chunks
    encoded = encode_tensor(tensor, chunk_elems=4096)
    blob = bytearray(encoded.blob)
    for position in range(len(blob)):
        corrupt = bytearray(blob)
        corrupt[position] ^= 0x5A
        with pytest.raises(CorruptWeightsError, match=r"tensor w, chunk [01]"):
            decode_tensor("w", encoded.index, bytes(corrupt))
    with pytest.raises(CorruptWeightsError, match="chunk 1"):
        decode_tensor("w", encoded.index, bytes(blob[:-1]))


def test_an_index_that_does_not_cover_the_tensor_is_refused():
    encoded = encode_tensor((torch.randn(10000) * 0.02).to(torch.bfloat16), chunk_elems=4096)
    short = {**encoded.index, "chunks": encoded.index["chunks"][:-1]}
    with pytest.raises(CorruptWeightsError, match="covers 8192 of its 10000 values"):
        decode_tensor("w", short, encoded.blob)
    shifted = {**encoded.index, "chunks": [{**c, "offset": c["offset"] + 10**6} for c in encoded.index["chunks"]]}
    with pytest.raises(CorruptWeightsError, match="chunk 0: the index does not match"):
        decode_tensor("w", shifted, encoded.blob)
    with pytest.raises(CorruptWeightsError, match="dtype I32"):
        decode_tensor("w", {**encoded.index, "dtype": "I32"}, encoded.blob)
    with pytest.raises(ValueError, match=r"does not code torch\.int16"):
        encode_tensor(torch.zeros(5000, dtype=torch.int16), codec=BYTE_CODEC)


@pytest.mark.parametrize("words", [513, 4096])
def test_byte_codec_round_trips_every_int32_word(words):
    gen = torch.Generator().manual_seed(words)
    extremes = torch.tensor([0, -1, 2**31 - 1, -(2**31), 0x0F0F0F0F, -0x0F0F0F10], dtype=torch.int32)
    tensor = torch.cat([torch.randint(-(2**31), 2**31, (words,), generator=gen, dtype=torch.int64).int(), extremes])
    tensor = tensor.reshape(-1, 1 if tensor.numel() % 2 else 2)
    encoded = encode_tensor(tensor, chunk_elems=4098, threads=2, codec=BYTE_CODEC)  # chunks end inside words
    assert sum(c["count"] for c in encoded.index["chunks"]) == 4 * tensor.numel()
    decoded = decode_tensor("w", encoded.index, encoded.blob, threads=2)
    assert decoded.dtype == torch.int32 and torch.equal(decoded, tensor)


def test_byte_codec_codes_skewed_4bit_codes_below_4_bits_and_detects_corruption():
    gen = torch.Generator().manual_seed(0)
    codes = (torch.randn(8 * 4096, generator=gen) * 2.5 + 8).round().clamp(0, 15).to(torch.int64)
    words = (codes.reshape(-1, 8) << torch.arange(0, 32, 4)).sum(dim=1)
    tensor = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    encoded = encode_tensor(tensor, chunk_elems=8192, codec=BYTE_CODEC)
    counts = torch.bincount(codes, minlength=16).double() / codes.numel()
    entropy = -(counts[counts > 0] * counts[counts > 0].log2()).sum().item()
    bits = 8 * len(encoded.blob) / codes.numel()
    assert entropy < bits < entropy + 0.15 and bits < 3.6  # 8 KiB chunks of code pairs: headers cost ~0.1 bit
    blob = bytearray(encoded.blob)
    for position in range(0, len(blob), 97):
        corrupt = bytearray(blob)
        corrupt[position] ^= 0x01
        with pytest.raises(CorruptWeightsError, match=r"tensor w, chunk \d"):
            decode_tensor("w", encoded.index, bytes(corrupt))


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, tokenizer_dir):
    """A tiny Llama with tensors large enough to be coded (hidden 64, MLP 256)."""
    from conftest import CONFIGS

    CONFIGS["small-llama"] = {**CONFIGS["llama"], "hidden_size": 64, "intermediate_size": 256}
    try:
        return build_tiny("small-llama", tokenizer_dir, tmp_path_factory.mktemp("small-llama"))
    finally:
        del CONFIGS["small-llama"]


def _tensor_hashes(path) -> dict[str, str]:
    hashes = {}
    with safe_open(path, "pt") as fh:
        for name in sorted(fh.keys()):
            tensor = fh.get_tensor(name)
            raw = _bits(tensor) if tensor.is_floating_point() else tensor
            hashes[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return hashes


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_artifact_decode_restores_identical_tensors(cli, small_llama, tmp_path, dtype):
    coded, restored, plain = tmp_path / "coded", tmp_path / "restored", tmp_path / "plain"
    assert cli("convert", "dtype", small_llama, "-o", plain, "--dtype", dtype, "--no-eval").exit_code == 0
    result = cli("quantize", "entropy", plain, "-o", coded, "--format", "json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["coded_tensors"] > 0 and metrics["ratio"] < 1.0
    assert (coded / CONTAINER_NAME).is_file() and not (coded / "model.safetensors").exists()

    assert cli("quantize", "decode", coded, "-o", restored, "--format", "quiet").exit_code == 0
    assert _tensor_hashes(restored / "model.safetensors") == _tensor_hashes(plain / "model.safetensors")

    original = load_checkpoint(str(plain)).model
    model, _ = streamify.load(str(coded))
    ids = torch.randint(0, 384, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_entropy_must_be_the_last_stage(cli, small_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {small_llama}\nstages:\n  - quantize.entropy: {{}}\n  - convert.dtype: {{}}\n")
    result = cli("recipe", "validate", recipe)
    assert result.exit_code == 2 and "must come last" in result.stderr


def test_corrupt_artifact_is_reported_with_tensor_and_chunk(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval", "--chunk-elems", "4096").exit_code == 0
    container = coded / CONTAINER_NAME
    index = read_index(container)
    name = "model.layers.1.mlp.up_proj.weight"
    header = read_header(container)
    start = 8 + int.from_bytes(container.read_bytes()[:8], "little") + header[name]["data_offsets"][0]
    chunk = index["tensors"][name]["chunks"][2]
    data = bytearray(container.read_bytes())
    data[start + chunk["offset"] + chunk["length"] // 2] ^= 0xFF
    container.write_bytes(bytes(data))
    result = cli("eval", coded, "--max-tokens", "256", "--seq-len", "64")
    assert result.exit_code == 3
    assert f"tensor {name}, chunk 2" in result.stderr and "checksum" in result.stderr
    decoded = cli("quantize", "decode", coded, "-o", tmp_path / "restored")
    assert decoded.exit_code == 3 and not (tmp_path / "restored").exists()


def test_truncated_container_is_detected(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    container = coded / CONTAINER_NAME
    container.write_bytes(container.read_bytes()[:-1000])
    result = cli("eval", coded, "--max-tokens", "256", "--seq-len", "64")
    assert result.exit_code == 3 and CONTAINER_NAME in result.stderr


def test_lazy_loading_decodes_one_block_at_a_time(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    eager, _ = streamify.load(str(coded))
    lazy, _ = streamify.load(str(coded), lazy=True)
    blocks = lazy.model.layers

    def materialized() -> int:
        return sum(all(p.device.type != "meta" for p in b.parameters()) for b in blocks)

    seen = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(materialized()))
    assert materialized() == 0
    ids = torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lazy(ids).logits, eager(ids).logits)
    assert seen == [1] * len(blocks), "exactly one block decoded while each block runs"
    assert materialized() == 0, "blocks are dropped after they run"


def test_inspect_shows_ratios_per_group(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    info = json.loads(cli("inspect", coded, "--format", "json").stdout)
    groups = info["entropy"]["groups"]
    assert "model.layers.*.mlp.up_proj.weight" in groups
    assert groups["model.layers.*.mlp.up_proj.weight"]["ratio"] < 0.95
    assert groups["model.norm.weight"]["ratio"] == 1.0
    stored = sum(g["stored_bytes"] for g in groups.values())
    assert stored == sum(
        e["data_offsets"][1] - e["data_offsets"][0]
        for k, e in read_header(coded / CONTAINER_NAME).items()
        if k != "__metadata__"
    )


def test_decode_tensors_reads_names_on_demand(small_llama, tmp_path, cli):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    got = decode_tensors(coded / CONTAINER_NAME, ["model.norm.weight"])
    assert list(got) == ["model.norm.weight"]


def test_int4_codes_are_entropy_coded_and_restore_the_compressed_tensors_files(cli, small_llama, tmp_path):
    plain, coded, restored = tmp_path / "plain", tmp_path / "coded", tmp_path / "restored"
    command = ("quantize", "int4", small_llama, "--method", "rtn", "--group-size", "32", "--no-eval")
    assert cli(*command, "-o", plain, "--format", "quiet").exit_code == 0
    result = cli(*command, "-o", coded, "--entropy", "--format", "json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert not (coded / "model.safetensors").exists()
    entries = read_index(coded / CONTAINER_NAME)["tensors"]
    packed = [name for name in entries if name.endswith("weight_packed")]
    assert len(packed) == metrics["quantized_modules"] > 0
    coded_packed = [name for name in packed if entries[name]["storage"] == "coded"]
    assert coded_packed == [name for name in packed if ".mlp." in name]  # attention's 2 KiB of codes stay raw
    assert all(entries[name]["codec"] == BYTE_CODEC for name in coded_packed)
    assert 0 < metrics["code_bits_per_weight"] < 4 < metrics["bits_per_weight"] < 4 + 2 * 16 / 32

    assert cli("quantize", "decode", coded, "-o", restored, "--format", "quiet").exit_code == 0
    assert _tensor_hashes(restored / "model.safetensors") == _tensor_hashes(plain / "model.safetensors")
    later, restored_later = tmp_path / "later", tmp_path / "restored-later"  # an INT4 artifact coded afterwards
    assert cli("quantize", "entropy", plain, "-o", later, "--no-eval", "--format", "quiet").exit_code == 0
    assert cli("quantize", "decode", later, "-o", restored_later, "--format", "quiet").exit_code == 0
    assert _tensor_hashes(restored_later / "model.safetensors") == _tensor_hashes(plain / "model.safetensors")
    from_plain, _ = streamify.load(str(plain))
    from_coded, _ = streamify.load(str(coded))
    ids = torch.randint(0, 384, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_coded(ids).logits, from_plain(ids).logits)
    refused = cli(*command, "-o", tmp_path / "g", "--entropy", "--weights-format", "gguf", "--sym")
    assert refused.exit_code == 2 and "entropy" in refused.stderr and not (tmp_path / "g").exists()


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_int4_artifacts_run_lazily_with_the_eager_logits(cli, small_llama, tmp_path, dtype):
    """--lazy on an INT4 artifact, plain or entropy-coded: each block's codes are read (decoded) and dequantized
    as it runs, then dropped; the logits are transformers' on the whole compressed-tensors checkpoint."""
    plain, coded = tmp_path / "plain", tmp_path / "coded"
    command = ("quantize", "int4", small_llama, "--method", "rtn", "--group-size", "32", "--no-eval")
    assert cli(*command, "-o", plain, "--format", "quiet").exit_code == 0
    assert cli(*command, "-o", coded, "--entropy", "--format", "quiet").exit_code == 0
    options = {} if dtype == "auto" else {"dtype": torch.float32}
    reference = AutoModelForCausalLM.from_pretrained(plain, **options).eval()  # no streamify
    ids = torch.randint(0, 384, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        for folder in (plain, coded):
            lazy, _ = streamify.load(str(folder), lazy=True, dtype=dtype)
            assert all(p.device.type == "meta" for p in lazy.model.layers.parameters())
            for _ in range(2):  # the second pass decodes into the buffers the first one used
                assert torch.equal(lazy(ids).logits, expected), folder.name
            assert all(p.device.type == "meta" for p in lazy.model.layers.parameters())
    scores = [
        json.loads(cli("eval", folder, *lazy, "--max-tokens", "64", "--seq-len", "32", "--format", "json").stdout)
        for folder, lazy in ((plain, ()), (coded, ("--lazy",)))
    ]
    assert scores[0]["model"]["perplexity"] == scores[1]["model"]["perplexity"]
    # scales stored in another dtype than the model's (other tools): dequantized in the model's, as transformers
    weights = load_file(plain / "model.safetensors")
    other = {n: t.half() if n.endswith("weight_scale") else t for n, t in weights.items()}
    save_file(other, plain / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(plain, **options).eval()
    lazy, _ = streamify.load(str(plain), lazy=True, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(lazy(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("format", "float-quantized", "pack-quantized"), ("quant_method", "gptq", "these are gptq")],
)
def test_lazy_loading_refuses_a_quantization_it_cannot_dequantize(cli, small_llama, tmp_path, key, value, message):
    folder = tmp_path / "int4"
    command = ("quantize", "int4", small_llama, "--method", "rtn", "--group-size", "32", "--no-eval")
    assert cli(*command, "-o", folder, "--format", "quiet").exit_code == 0
    config = json.loads((folder / "config.json").read_text())
    settings = config["quantization_config"]
    (settings["config_groups"]["group_0"] if key == "format" else settings)[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("eval", folder, "--lazy", "--max-tokens", "64", "--seq-len", "32")
    assert result.exit_code == 2 and message in result.stderr and "without --lazy" in result.stderr


def test_block_wise_stages_refuse_quantized_weights(cli, small_llama, tmp_path):
    """A block-wise stage reads floating-point weights: an INT4 input is ruled out in the plan (exit 2), not
    dequantized into an artifact that still says it is quantized."""
    folder = tmp_path / "int4"
    command = ("quantize", "int4", small_llama, "--method", "rtn", "--group-size", "32", "--no-eval")
    assert cli(*command, "-o", folder, "--format", "quiet").exit_code == 0
    for stage in (("quantize", "entropy"), ("convert", "dtype", "--dtype", "fp32")):
        result = cli(*stage, folder, "-o", tmp_path / "out", "--blockwise", "on", "--no-eval")
        assert result.exit_code == 2 and "its weights are quantized" in result.stderr
        assert not (tmp_path / "out").exists()


def _as_version_2(folder) -> None:
    """Rewrite a container as streamify wrote it before xxh3 (format 2, codec 1: CRC-32 checksums)."""
    import zlib

    from streamify.codec import container as module

    path = folder / CONTAINER_NAME
    meta = read_index(path)
    with safe_open(path, "pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a mapping)
    for name, entry in meta["tensors"].items():
        data = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if entry["storage"] == "raw":
            entry["crc32"] = zlib.crc32(data)
            del entry["xxh3_64"]
            continue
        entry["codec_version"] = 1
        for chunk in entry["chunks"]:
            chunk["crc32"] = zlib.crc32(data[chunk["offset"] : chunk["offset"] + chunk["length"]])
            del chunk["xxh3_64"]
    saved = module.FORMAT_VERSION
    module.FORMAT_VERSION = 2
    try:
        write_container(path, tensors, meta["tensors"], meta["files"])
    finally:
        module.FORMAT_VERSION = saved


def test_containers_of_format_2_with_crc32_still_decode_and_detect_corruption(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval", "--chunk-elems", "4096").exit_code == 0
    expected = decode_tensors(coded / CONTAINER_NAME)
    _as_version_2(coded)
    index = read_index(coded / CONTAINER_NAME)
    assert index["format_version"] == 2 and "crc32" in index["tensors"]["model.norm.weight"]
    got = decode_tensors(coded / CONTAINER_NAME, threads=2)
    assert all(torch.equal(_bits(got[n]), _bits(t)) if t.is_floating_point() else torch.equal(got[n], t)
               for n, t in expected.items())  # fmt: skip
    name = "model.layers.1.mlp.up_proj.weight"
    header = read_header(coded / CONTAINER_NAME)
    data = bytearray((coded / CONTAINER_NAME).read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0]
    chunk = index["tensors"][name]["chunks"][1]
    data[start + chunk["offset"] + 3] ^= 0x10
    (coded / CONTAINER_NAME).write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError, match=f"tensor {name}, chunk 1.*checksum"):
        decode_tensors(coded / CONTAINER_NAME, [name])


def test_lazy_forward_reads_the_next_block_in_the_background(cli, small_llama, tmp_path, monkeypatch):
    import threading
    import time

    from streamify.codec.load import ContainerWeights

    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    eager, _ = streamify.load(str(coded))
    reads = []
    original = ContainerWeights.load

    def recorded(self, names, into=None):
        blocks = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        reads.append((threading.current_thread().name, sorted(blocks)))
        return original(self, names, into)

    monkeypatch.setattr(ContainerWeights, "load", recorded)
    lazy, _ = streamify.load(str(coded), lazy=True)
    reads.clear()
    memory = []  # where each block's coded weights are while the block runs

    def where(module, args):
        memory.extend(p.data_ptr() for p in module.parameters() if p.numel() >= 4096)

    for block in lazy.model.layers:
        block.register_forward_pre_hook(where)
    ids = torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):  # the second forward finds block 0 read ahead too
            assert torch.equal(lazy(ids).logits, eager(ids).logits)
    blocks = len(lazy.model.layers)
    coded_per_block = len(memory) // (2 * blocks)
    assert blocks >= 3 and coded_per_block >= 4
    assert len(set(memory)) == 2 * coded_per_block, "two blocks' buffers, reused block after block"
    assert reads[0] == ("MainThread", [0]), "only the very first block is read in the forward's own thread"
    deadline = time.monotonic() + 30  # block 0's read for a next forward may still be starting in the background
    while len(reads) < 2 * blocks + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    ahead = [b for thread, b in reads[1:] if thread.startswith("streamify-prefetch")]
    assert ahead == [[i % blocks] for i in range(1, 2 * blocks + 1)] and len(reads) == 2 * blocks + 1


def test_lazy_forward_reports_a_corrupt_block_read_ahead(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    container = coded / CONTAINER_NAME
    name = "model.layers.1.mlp.up_proj.weight"  # read by the background thread while block 0 runs
    header = read_header(container)
    data = bytearray(container.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0] + 5] ^= 0x21
    container.write_bytes(bytes(data))
    lazy, _ = streamify.load(str(coded), lazy=True)
    with torch.no_grad(), pytest.raises(CorruptWeightsError, match=f"tensor {name}, chunk 0.*checksum"):
        lazy(torch.zeros(1, 8, dtype=torch.long))


def test_generate_lazy_from_coded_weights_gives_the_eager_text(cli, small_llama, tmp_path):
    coded = tmp_path / "coded"
    assert cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval").exit_code == 0
    runs = {}
    for mode in ([], ["--lazy"]):
        result = cli("generate", coded, "--prompt", "def f(x):", "--max-new-tokens", "10", *mode, "--format", "json")
        assert result.exit_code == 0, result.stderr
        runs[bool(mode)] = json.loads(result.stdout)
    assert runs[True]["text"] == runs[False]["text"] and runs[True]["new_tokens"] == 10
    assert runs[True]["tokens_per_s"] > 0


_CODE_UNDER_A_LIMIT = """
import resource, sys
from pathlib import Path
import shutil
from streamify.codec.container import code_checkpoint
from streamify.codec.restore import restore_files
from streamify.progress import SILENT

def field(name):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(name + ":"))

source, coded, restored, limit = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_DATA, (field("VmData") + limit, resource.RLIM_INFINITY))
base = field("VmRSS")
checkpoint = code_checkpoint(lambda folder: shutil.copy(source, folder), 8, 1 << 18, 2, SILENT)
checkpoint.write(coded)
restore_files(coded / "model.entropy.safetensors", restored, config=None, threads=2)
print(field("VmHWM") - base)
"""


def test_a_model_larger_than_the_memory_limit_is_coded_and_restored_tensor_by_tensor(tmp_path):
    """320 MB of weights, coded and restored by a process whose heap may grow by 160 MB only."""
    import subprocess
    import sys

    source = tmp_path / "model.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": (torch.randn(4096, 2048, generator=gen) * 0.02).bfloat16() for i in range(20)}
    save_file(tensors, source, metadata={"format": "pt"})
    digests = {name: hashlib.sha256(t.view(torch.int16).numpy().tobytes()).hexdigest() for name, t in tensors.items()}
    del tensors
    (tmp_path / "coded").mkdir()
    (tmp_path / "restored").mkdir()
    limit = 160 << 20
    args = [source, tmp_path / "coded", tmp_path / "restored", limit]
    run = subprocess.run([sys.executable, "-c", _CODE_UNDER_A_LIMIT, *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < limit < source.stat().st_size / 2
    with safe_open(tmp_path / "restored" / "model.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(digests)
        for name, digest in digests.items():
            assert hashlib.sha256(fh.get_tensor(name).view(torch.int16).numpy().tobytes()).hexdigest() == digest


def test_a_sharded_checkpoint_is_coded_into_one_container_per_shard(cli, small_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    coded = tmp_path / "coded"
    result = cli("quantize", "entropy", small_llama, "-o", coded, "--no-eval", "--max-shard-size", "300KB")
    assert result.exit_code == 0, result.stderr
    containers = sorted(p.name for p in coded.glob("*.entropy.safetensors"))
    assert len(containers) >= 3 and CONTAINER_NAME not in containers
    assert all(name.startswith("model-0000") for name in containers)
    assert (coded / "model.safetensors.index.json").is_file()  # transformers' shard index, kept as a side file
    info = json.loads(cli("inspect", coded, "--format", "json").stdout)
    assert info["entropy"]["containers"] == len(containers) and info["entropy"]["coded_tensors"] > 0

    reference = AutoModelForCausalLM.from_pretrained(small_llama)
    ids = torch.randint(0, 384, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        for lazy in (False, True):
            model, _ = streamify.load(str(coded), lazy=lazy)
            assert torch.equal(model(ids).logits, expected)

    restored = tmp_path / "restored"
    assert cli("quantize", "decode", coded, "-o", restored).exit_code == 0
    shards = sorted(p.name for p in restored.glob("*.safetensors"))
    assert shards == [name.replace(".entropy", "") for name in containers]
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(restored)(ids).logits, expected)


def test_lazy_one_block_model_and_a_grad_forward_after_inference_mode(small_llama, tmp_path, cli, tokenizer_dir):
    """One block: nothing is read ahead into the buffers in use; buffers made under inference mode still serve a
    forward that records gradients (inputs that require them)."""
    from conftest import CONFIGS

    CONFIGS["one-block"] = {**CONFIGS["llama"], "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1}
    try:
        plain = build_tiny("one-block", tokenizer_dir, tmp_path / "one-block")
    finally:
        del CONFIGS["one-block"]
    for source in (plain, small_llama):
        coded = tmp_path / f"coded-{source.name}"
        assert cli("quantize", "entropy", source, "-o", coded, "--no-eval").exit_code == 0
        eager, _ = streamify.load(str(coded))
        lazy, _ = streamify.load(str(coded), lazy=True)
        ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            expected = eager(ids).logits
            for _ in range(3):
                assert torch.equal(lazy(ids).logits, expected)
        embeds = eager.get_input_embeddings()(ids).detach().requires_grad_()
        lazy(inputs_embeds=embeds).logits.sum().backward()
        reference = embeds.detach().clone().requires_grad_()
        eager(inputs_embeds=reference).logits.sum().backward()
        # the backward pass used each block's own weights, not buffers reused for a later block
        assert embeds.grad.abs().sum() > 0 and torch.allclose(embeds.grad, reference.grad, atol=1e-5)


def test_reads_longer_than_one_system_call_are_completed(tmp_path, monkeypatch):
    """Linux gives at most ~2 GiB a read: reads are looped (here every read is cut to 4 KiB)."""
    from streamify.io import safetensors_file

    monkeypatch.setattr(safetensors_file, "_MOST_PER_READ", 4096)
    tensors = {
        "w": (torch.randn(300, 200) * 0.02).bfloat16(),
        "u16": torch.arange(5000, dtype=torch.int64).to(torch.uint16),
        "f8": torch.randn(70, 100).to(torch.float8_e4m3fn),
    }

    def save(folder):
        save_file(tensors, folder / "model.safetensors")

    code_checkpoint(save, level=8, chunk_elems=8192, threads=1, progress=SILENT).write(tmp_path)
    got = decode_tensors(tmp_path / CONTAINER_NAME)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8))


def test_a_shard_size_transformers_cannot_read_is_refused(cli, small_llama, tmp_path):
    result = cli("quantize", "entropy", small_llama, "-o", tmp_path / "x", "--max-shard-size", "1.5GB", "--dry-run")
    assert result.exit_code == 2 and "1.5GB" in result.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("arch", "shard"), [("small-llama", "5GB"), ("small-llama", "300KB"), ("gemma", "5GB")])
def test_block_by_block_coding_gives_the_in_memory_artifact(cli, small_llama, tiny_models, tmp_path, arch, shard):
    """--blockwise on reads, codes and drops one block at a time: the same tensors, names, containers and
    config as in memory (gemma: tied embeddings stored once); quantize decode gives back a checkpoint
    transformers loads."""
    from transformers import AutoModelForCausalLM

    source = small_llama if arch == "small-llama" else tiny_models[arch]
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        args = ["--blockwise", mode, "--max-shard-size", shard, "--no-eval", "--format", "json"]
        result = cli("quantize", "entropy", source, "-o", out, *args)
        assert result.exit_code == 0, result.stderr
        metrics = json.loads(result.stdout)["stages"][0]["metrics"]
        assert (metrics.get("path") == "block-wise") == (mode == "on")
        runs[mode] = out
    containers = {mode: sorted(p.name for p in out.glob("*.entropy.safetensors")) for mode, out in runs.items()}
    assert len(containers["on"]) == len(containers["off"]) == (1 if shard == "5GB" else len(containers["on"]))
    assert (len(containers["on"]) > 1) == (shard == "300KB")
    decoded = {}
    for mode, out in runs.items():
        decoded[mode] = {}
        for path in out.glob("*.entropy.safetensors"):
            decoded[mode].update(decode_tensors(path))
    assert sorted(decoded["on"]) == sorted(decoded["off"])
    for name, tensor in decoded["off"].items():
        assert torch.equal(decoded["on"][name].view(torch.uint8), tensor.view(torch.uint8)), name
    config = {mode: json.loads((out / "config.json").read_text()) for mode, out in runs.items()}
    assert config["on"] == config["off"]
    restored = tmp_path / "restored"
    assert cli("quantize", "decode", runs["on"], "-o", restored).exit_code == 0
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source)(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(restored)(ids).logits, expected)
