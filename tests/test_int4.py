"""INT4 weights: the grid, GPTQ, compressed-tensors and GGUF artifacts, loading them in real runtimes."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import streamify
from streamify.arch import arch_for
from streamify.io.artifact import save_model_files
from streamify.io.load import load_checkpoint
from streamify.io.safetensors_file import read_header
from streamify.model.executor import BlockExecutor
from streamify.pipeline.registry import StageContext, get_stage
from streamify.progress import Progress
from streamify.quantize.int4.awq import InputSample, fold_scales, search_scale
from streamify.quantize.int4.gguf import pack_q4
from streamify.quantize.int4.gptq import HessianAccumulator, gptq
from streamify.quantize.int4.grid import QMAX, QMIN, rtn
from streamify.quantize.int4.stage import Int4Params

IDS = torch.arange(5, 69)[None]


def quantized(model_dir, **params):
    """The checkpoint after quantize.int4 with ``params`` (in memory: dequantized weights)."""
    checkpoint = load_checkpoint(str(model_dir))
    ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:pydoc")
    return get_stage("quantize.int4").run(checkpoint, Int4Params(**params), ctx)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_grid_error_is_at_most_half_a_step(symmetric, scale_dtype):
    weight = torch.randn(16, 128) * torch.linspace(0.01, 3, 128)
    q = rtn(weight, 32, symmetric, scale_dtype)
    assert q.codes.dtype == torch.int8 and q.codes.min() >= QMIN and q.codes.max() <= QMAX
    step = q.scale.float().repeat_interleave(32, dim=1)
    error = (q.dequantize(torch.float32) - weight).abs()
    rounding = weight.abs() * torch.finfo(scale_dtype).eps  # the product is rounded to the scale's dtype
    assert (error <= 0.5 * step + rounding + 1e-6).all()
    if symmetric:
        assert (q.zero == 0).all()


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_weights_halfway_between_codes_are_not_all_rounded_towards_zero(scale_dtype):
    """Weights from a 4-bit grid (a dequantized GGUF) sit halfway between codes of the new grid; scales stored
    in 16 bits must not all be rounded up, or every such weight shrinks (+7% perplexity on SmolLM2)."""
    generator = torch.Generator().manual_seed(0)
    steps = torch.rand(512, 1, generator=generator) + 0.5
    halves = torch.randint(-7, 7, (512, 32), generator=generator) + 0.5
    halves[:, 0] = 7.5  # the group's largest weight: scale = 7.5 / 7.5 steps
    weight = halves * steps
    q = rtn(weight, 32, True, scale_dtype)
    shrink = ((q.dequantize(torch.float32).abs() - weight.abs()) / steps)[:, 1:]
    assert abs(shrink.mean().item()) < 0.1  # rounding every scale up gives -0.5


def test_gptq_beats_rtn_on_the_layer_output():
    torch.manual_seed(0)
    mixing = torch.randn(64, 64)
    inputs = torch.randn(2048, 64) @ mixing  # correlated inputs: where GPTQ's error feedback pays off
    weight = torch.randn(32, 64)
    acc = HessianAccumulator(64, torch.device("cpu"))
    for chunk in inputs.split(256):
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 * inputs.T @ inputs / inputs.shape[0], rtol=1e-4, atol=1e-3)
    reference = inputs @ weight.T
    errors = {}
    for name, q in {
        "rtn": rtn(weight, 32, True, torch.float32),
        "gptq": gptq(weight, acc.hessian, 32, True, torch.float32),
        "gptq act-order": gptq(weight, acc.hessian, 32, True, torch.float32, act_order=True),
    }.items():
        errors[name] = (inputs @ q.dequantize(torch.float32).T - reference).pow(2).mean().item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    assert errors["gptq act-order"] < 0.8 * errors["rtn"], errors


AWQ_CONFIGS = {  # families whose blocks differ from Llama's, beside tiny_models' llama, qwen2 and gemma
    "gemma2": {"head_dim": 8},  # post-norms after attention and MLP
    "gemma3_text": {"head_dim": 8},  # post-norms and q/k norms
    "olmo2": {},  # no pre-norms at all
    "phi3": {"pad_token_id": 0},  # fused qkv_proj and gate_up_proj
}


def _awq_model(arch: str, tiny_models):
    if arch in tiny_models:
        return AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    from conftest import TINY, tiny_model

    model = tiny_model(arch, **TINY, **AWQ_CONFIGS[arch])
    with torch.no_grad():  # norms that start at 1 (or 0 for Gemma's 1 + w) would hide a wrong fold
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.rand_like(param))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", *AWQ_CONFIGS])
def test_awq_folding_keeps_the_float_function(tiny_models, arch):
    """AWQ's scales go where the architecture's adapter says: before rounding, the model computes the same.

    Every group the adapter declares is scaled (but v -> o under grouped-query
    attention, which has no 1:1 channel), and the logits move by at most 1e-4.
    """
    model = _awq_model(arch, tiny_models)
    before = logits(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = arch_for(model.config.model_type).awq_groups
    modules = dict(model.named_modules())
    for index in range(model.config.num_hidden_layers):
        block = f"model.layers.{index}"
        names = [n for n in modules if n.startswith(block + ".") and isinstance(modules[n], torch.nn.Linear)]
        samples = {}
        for name in names:
            samples[name] = InputSample()
            samples[name].add(
                torch.randn(64, modules[name].in_features) * torch.linspace(0.1, 5, modules[name].in_features)
            )
        alphas, skipped = fold_scales(modules, block, groups, names, samples, 8, True, torch.float32)
        assert set(alphas) | set(skipped) == {g.previous for g in groups}
        assert set(skipped) <= {"self_attn.v_proj"}
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert any("mlp" in n for n in changed), "AWQ scaled nothing: the test would prove nothing"
    assert torch.allclose(logits(model), before, atol=1e-4, rtol=1e-4)


def test_awq_refuses_an_architecture_without_scale_groups(tokenizer_dir, tmp_path, cli):
    """Phi (one LayerNorm feeding attention and MLP in parallel) has no declared scale groups: AWQ refuses
    (exit 3) before any weight is read, instead of quietly giving RTN under its name."""
    config = AutoConfig.for_model(
        "phi", vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "phi")
    result = cli("quantize", "int4", tmp_path / "phi", "-o", tmp_path / "q", "--method", "awq", "--dry-run")
    assert result.exit_code == 3 and "AWQ is not available for the 'phi' architecture" in result.stderr
    assert "supported architectures: gemma" in result.stderr and not (tmp_path / "q").exists()


def test_awq_search_protects_a_salient_channel():
    """alpha = 0 is plain RTN; a salient channel (large activations, small weights) makes scaling win."""
    torch.manual_seed(0)
    inputs = torch.randn(512, 64)
    inputs[:, 3] *= 40  # an outlier channel, as LLM activations have
    linear = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight[:, 3] *= 0.1  # its weights sit well inside the group's range: room to scale them up
    scale, alpha = search_scale([linear], inputs, 32, True, torch.float32)
    reference = inputs @ linear.weight.T

    def error(q_scale):
        q = rtn(linear.weight * q_scale, 32, True, torch.float32).dequantize(torch.float32) / q_scale
        return (inputs @ q.T - reference).pow(2).mean().item()

    assert alpha > 0 and error(scale) < 0.9 * error(torch.ones(64))


@pytest.mark.parametrize(("qtype", "symmetric"), [("Q4_0", True), ("Q4_1", False)])
def test_gguf_blocks_decode_with_ggufs_own_dequantizer(qtype, symmetric):
    weight = torch.randn(8, 96)
    q = rtn(weight, 32, symmetric, torch.float16)
    q.scale = q.scale.float()  # as quantize.int4 keeps them for GGUF: fp16 values, fp32 products (as llama.cpp)
    raw = getattr(gguf.GGMLQuantizationType, qtype)
    decoded = gguf.quants.dequantize(pack_q4(q, qtype), raw)
    ours = q.dequantize(torch.float32).numpy()
    tolerance = 0 if qtype == "Q4_0" else 2e-3  # Q4_1 stores m = -(8 + zero)·d in fp16
    assert np.abs(decoded - ours).max() <= tolerance * np.abs(ours).max()


@pytest.mark.parametrize(("act_order", "calibration_dtype"), [(False, "auto"), (True, "auto"), (False, "bf16")])
def test_compressed_tensors_artifact_reloads_to_the_same_logits(tiny_llama, tmp_path, act_order, calibration_dtype):
    checkpoint = quantized(
        tiny_llama,
        method="gptq",
        group_size=32,
        act_order=act_order,
        calibration_dtype=calibration_dtype,
        samples=4,
        seq_len=64,
    )
    save_model_files(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == 32 and weights["symmetric"]
    assert config["ignore"] == ["lm_head"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers + compressed-tensors, no streamify
    assert torch.equal(logits(plain), logits(checkpoint.model))
    model, _ = streamify.load(str(tmp_path))
    assert torch.equal(logits(model), logits(checkpoint.model))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(logits(original), logits(checkpoint.model))


def test_ignore_patterns_keep_layers_in_float(tiny_llama, tmp_path):
    checkpoint = quantized(tiny_llama, method="rtn", group_size=32, ignore=["re:.*mlp.*"])
    save_model_files(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert sorted(config["ignore"]) == sorted(
        ["lm_head"] + [f"model.layers.{i}.mlp.{p}_proj" for i in range(4) for p in ("gate", "up", "down")]
    )
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    kept = checkpoint.model.model.layers[1].mlp.up_proj.weight  # not rounded to 4 bits, only stored in bf16
    assert kept.dtype == torch.bfloat16 and torch.equal(original.model.layers[1].mlp.up_proj.weight.bfloat16(), kept)


@pytest.mark.parametrize("float_dtype", ["auto", "fp32"])
def test_what_stays_float_is_stored_in_the_float_dtype(tiny_llama, tmp_path, float_dtype):
    """auto: an fp32 model's embedding, norms and scales are written in bf16 (half the bytes); fp32 keeps them."""
    checkpoint = quantized(tiny_llama, method="rtn", group_size=32, float_dtype=float_dtype)
    save_model_files(checkpoint, tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    dtypes = {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    floats = {dtypes[n] for n in dtypes if n.endswith(("embed_tokens.weight", "norm.weight", "weight_scale"))}
    assert floats == {"BF16" if float_dtype == "auto" else "F32"}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(plain), logits(checkpoint.model))


@pytest.mark.parametrize(("qtype", "symmetric"), [("Q4_0", True), ("Q4_1", False)])
def test_gguf_artifact_runs_in_llama_cpp(tiny_llama, tmp_path, qtype, symmetric):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency: run make test")
    checkpoint = quantized(
        tiny_llama, method="rtn", group_size=32, symmetric=symmetric, weights_format="gguf", gguf_type=qtype
    )
    save_model_files(checkpoint, tmp_path)
    # the embedding in Q8_0 as llama.cpp's quantizer stores it; the in-memory model holds exactly those values
    (table,) = [t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors if t.name == "token_embd.weight"]
    assert table.tensor_type == gguf.GGMLQuantizationType.Q8_0
    stored = gguf.quants.dequantize(table.data, table.tensor_type)
    assert np.array_equal(stored, checkpoint.model.model.embed_tokens.weight.detach().numpy())
    ours = logits(checkpoint.model).numpy()
    original = logits(AutoModelForCausalLM.from_pretrained(tiny_llama)).numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(IDS[0].tolist())
    theirs = np.array(llm.scores[: IDS.shape[1]])
    # llama.cpp multiplies Q4 weights with 8-bit activations and an fp16 embedding: close, not equal;
    # far closer to our quantized model than the quantized model is to the original weights
    assert np.abs(theirs - ours).max() < 0.25 * np.abs(original - ours).max()
    text = llm("def main():", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert isinstance(text, str) and llm.n_tokens > 3
    reloaded, _ = streamify.load(str(tmp_path))  # transformers' GGUF reader, through streamify
    assert np.abs(logits(reloaded).numpy() - ours).max() < 0.25 * np.abs(original - ours).max()


def test_llama_cpp_is_installed_for_the_suite():
    """The GGUF test above must not skip silently in CI: llama-cpp-python is installed by make test."""
    import llama_cpp

    assert llama_cpp.__version__


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"group_size": 64}, "group size 64 does not divide the input size 32 of model.layers.0.self_attn.q_proj"),
        ({"group_size": 64, "weights_format": "gguf"}, "weights_format gguf stores blocks of 32"),
        ({"bits": 8}, "4-bit"),
        ({"symmetric": False}, "asymmetric compressed-tensors artifacts do not reload"),
        ({"targets": ["nope"]}, "'nope' matches no module"),
    ],
)
def test_bad_int4_options(cli, tiny_llama, tmp_path, params, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps({"model": str(tiny_llama), "stages": [{"quantize.int4": {"method": "rtn", **params}}]})
    )
    result = cli("run", recipe, f"output={tmp_path / 'out'}")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_already_quantized_input_is_refused(cli, tiny_llama, tmp_path):
    first = tmp_path / "int4"
    assert (
        cli("quantize", "int4", tiny_llama, "-o", first, "--method", "rtn", "--group-size", "32", "--no-eval").exit_code
        == 0
    )
    again = cli("quantize", "int4", first, "-o", tmp_path / "twice", "--method", "rtn", "--group-size", "32")
    assert again.exit_code == 3 and "already quantized (compressed-tensors)" in again.stderr
    shutil.rmtree(first)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_killed_calibration_resumes_to_the_same_weights(tiny_llama, tmp_path, method, monkeypatch):
    """A calibration that dies after block 2 resumes there and ends with the uninterrupted run's weights."""
    import streamify.quantize.int4.calibrate as calibrate

    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    params = {"method": method, "group_size": 32, "samples": 4, "seq_len": 64}
    monkeypatch.setattr(calibrate, "CHECKPOINT_EVERY", 1)
    whole = quantized(tiny_llama, **params).model.state_dict()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)

    original = BlockExecutor.run_block
    calls = {"count": 0}

    def dies_in_block_3(self, index, inputs):
        calls["count"] += 1
        if calls["count"] == 6:  # statistics + propagation passes of blocks 0-1, then block 2's statistics pass
            raise KeyboardInterrupt("killed")
        return original(self, index, inputs)

    monkeypatch.setattr(BlockExecutor, "run_block", dies_in_block_3)
    with pytest.raises(KeyboardInterrupt):
        quantized(tiny_llama, **params)
    assert list((tmp_path / "cache" / "calibrate").glob("*/calibration_state.pt"))
    monkeypatch.setattr(BlockExecutor, "run_block", original)
    logs = []

    class Log(Progress):
        def log(self, message: str) -> None:
            logs.append(message)

    checkpoint = load_checkpoint(str(tiny_llama))
    ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:pydoc", progress=Log())
    resumed = get_stage("quantize.int4").run(checkpoint, Int4Params(**params), ctx).model.state_dict()
    assert any("resumed after block 2/4" in line for line in logs), logs
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not list((tmp_path / "cache" / "calibrate").glob("*/*")), "the checkpoint is removed at the end"
