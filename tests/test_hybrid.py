"""distill.hybrid: Llama-family decoders rewritten as Mamba2/attention hybrids, aligned, distilled, streamed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import streamify
import streamify.distill.hybrid as hybrid_stage
from conftest import killed_at_call, tiny_model
from streamify.distill.hybrid import HybridParams, kl_guided_layers
from streamify.distill.hybrid_model import to_hybrid
from streamify.io.load import load_checkpoint
from streamify.pipeline.registry import StageContext, get_stage
from streamify.progress import SILENT
from streamify.runtime.attention import enable_streaming
from streamify.runtime.cache import cache_bytes, new_cache
from streamify.runtime.spec import make_spec

RUN = ["--align-tokens", "4096", "--tokens", "4096", "--seq-len", "64", "--format", "json"]


def _ids(length: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("source", ["llama", "qwen2"])
@pytest.mark.parametrize("target", ["granitemoehybrid", "bamba"])
def test_the_rewrite_with_every_layer_kept_gives_the_teachers_logits(source, target):
    """The rewrite itself is lossless: attention, norms, MLPs and embeddings hold the source's weights exactly."""
    from conftest import TINY

    teacher = tiny_model(source, **TINY)
    hybrid = to_hybrid(teacher, [False] * 4, "copy", target, "test").eval()
    assert hybrid.config.model_type == target
    with torch.no_grad():
        assert torch.equal(hybrid(_ids()).logits, teacher(_ids()).logits)


def test_copy_init_takes_v_k_q_o_and_random_init_does_not():
    """x <- V and B <- K (key/value heads repeated for the grouped queries), C <- Q, out_proj <- O."""
    from conftest import TINY

    teacher = tiny_model("llama", **TINY)
    attention = teacher.model.layers[1].self_attn
    copied = to_hybrid(teacher, [False, True, False, False], "copy", "granitemoehybrid", "test")
    mixer = copied.model.layers[1].mamba
    width, head_dim = 32, 8
    rows = mixer.in_proj.weight
    v_heads = attention.v_proj.weight.reshape(2, head_dim, 32)
    assert torch.equal(rows[width : 2 * width].reshape(4, head_dim, 32)[1], v_heads[0])  # query head 1: kv head 0
    assert torch.equal(rows[width : 2 * width].reshape(4, head_dim, 32)[2], v_heads[1])
    assert torch.equal(rows[2 * width : 3 * width].reshape(4, head_dim, 32)[3], attention.k_proj.weight[head_dim:])
    assert torch.equal(rows[3 * width : 4 * width], attention.q_proj.weight)
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    kept = {k: v for k, v in teacher.state_dict().items() if k.startswith(("model.layers.0.self_attn", "model.norm"))}
    assert all(torch.equal(copied.state_dict()[name], tensor) for name, tensor in kept.items())
    random = to_hybrid(teacher, [False, True, False, False], "random", "granitemoehybrid", "test")
    assert not torch.equal(random.model.layers[1].mamba.in_proj.weight[3 * width : 4 * width], attention.q_proj.weight)
    for hybrid in (copied, random):  # Mamba2's own time steps and decay, not transformers' dt_bias = 1, A = 1..heads
        mixer = hybrid.model.layers[1].mamba
        step = torch.nn.functional.softplus(mixer.dt_bias)
        assert ((step > 0.99e-3) & (step < 0.101)).all()
        assert ((mixer.A_log.exp() >= 1) & (mixer.A_log.exp() <= 16)).all() and torch.equal(mixer.D, torch.ones(4))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_models):
    """A tiny Llama distilled into a GraniteMoeHybrid with layers 1 and 3 as Mamba2 (both stages)."""
    from conftest import Cli

    out = tmp_path_factory.mktemp("hybrid") / "out"
    result = Cli()("distill", "hybrid", tiny_models["llama"], "-o", out, "--mamba-layers", "every:2", *RUN)
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)["stages"][0]["metrics"]


def test_alignment_and_distillation_each_lower_the_heldout_kl(distilled):
    _, metrics = distilled
    assert metrics["mamba_layers"] == [1, 3] and metrics["attention_layers"] == [0, 2]
    assert metrics["heldout_kl_aligned"] < 0.7 * metrics["heldout_kl_rewrite"]
    assert metrics["heldout_kl_after"] < metrics["heldout_kl_before"] == metrics["heldout_kl_aligned"]
    assert metrics["align_loss_last"] < metrics["align_loss_first"]


def test_the_artifact_loads_in_plain_transformers_and_caches_correctly(distilled):
    """config.json names layers as IBM's Granite 4.0 checkpoints do; cached and uncached generation agree."""
    out, _ = distilled
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert config["layer_types"] == ["attention", "mamba", "attention", "mamba"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [type(b.mamba).__name__ if b.mamba is not None else "attention" for b in model.model.layers] == [
        "attention",
        "GraniteMoeHybridMambaLayer",
        "attention",
        "GraniteMoeHybridMambaLayer",
    ]
    prompt = _ids(12)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=16, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_bamba_artifact_with_lora_distillation_reloads_in_plain_transformers(tmp_path, tiny_models, cli):
    """--target bamba: BambaForCausalLM with attn_layer_indices; stage 2 through LoRA (merged) still lowers KL."""
    out = tmp_path / "bamba"
    result = cli(
        "distill", "hybrid", tiny_models["qwen2"], "-o", out, "--mamba-layers", "0,1", "--target", "bamba",
        "--align-tokens", "0", "--tokens", "4096", "--seq-len", "64", "--lora-rank", "8", "--lr", "1e-3",
        "--no-eval", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["heldout_kl_after"] < metrics["heldout_kl_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BambaForCausalLM"] and config["attn_layer_indices"] == [2, 3]
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in name for name in names)  # the adapters are merged
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = _ids(10)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("target", ["granitemoehybrid", "bamba"])
def test_windowed_hybrid_streams_chunk_by_chunk_in_bounded_memory(target):
    """Mamba state + sink/window KV: chunked cached logits equal the whole sequence under the mask, and the
    cache holds its bound from the first chunk on (the window's ring is allocated once) and never grows."""
    from conftest import TINY

    hybrid = to_hybrid(tiny_model("llama", **TINY), [True, False, True, False], "copy", target, "test").eval()
    enable_streaming(hybrid, make_spec(2, 12, "none", 4, (0, 2)))
    ids = _ids(80)
    cache = new_cache(hybrid)
    pieces, sizes = [], []
    with torch.no_grad():
        whole = hybrid(ids).logits
        for start in range(0, 80, 5):
            pieces.append(hybrid(ids[:, start : start + 5], past_key_values=cache).logits)
            sizes.append(cache_bytes(cache))
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-5)
    assert len(set(sizes)) == 1 and sizes[0] > 0


@pytest.mark.parametrize("target", ["granitemoehybrid", "bamba"])
def test_windowed_artifact_streams_after_loading_and_equals_the_stock_model(tmp_path, tiny_models, cli, target):
    """The artifact's runtime (Mamba state + sink/window KV) against plain transformers token by token with
    StreamingLLM's cache (``eval --check equivalence``)."""
    out = tmp_path / "windowed"
    result = cli(
        "distill", "hybrid", tiny_models["llama"], "-o", out, "--mamba-layers", "0,2", "--window", "16",
        "--sinks", "2", "--align-tokens", "0", "--tokens", "2048", "--seq-len", "64", "--no-eval",
        "--target", target,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    spec = json.loads((out / "config.json").read_text())["streamify_streaming"]
    assert spec["layer_types"] == ["ssm", "sink_window", "ssm", "sink_window"]
    model, _ = streamify.load(str(out))
    cache = new_cache(model)
    sizes = []
    with torch.no_grad():
        for start in range(0, 120, 8):
            model(_ids(120)[:, start : start + 8], past_key_values=cache)
            sizes.append(cache.nbytes())
    assert sizes[-1] == sizes[4] > 0
    check = cli("eval", out, "--check", "equivalence", "--format", "json")  # against plain transformers
    assert check.exit_code == 0, check.stderr
    assert json.loads(check.stdout)["equivalence"]["max_rel_diff"] < 1e-4


def test_convert_streaming_keeps_a_hybrids_mamba_layers(tmp_path, tokenizer_dir, cli):
    """A hybrid made elsewhere (here: rewritten, saved) streams through convert streaming: its Mamba layers
    keep their state, its attention layers get sinks + window, and the runtime equals the stock model."""
    from conftest import TINY

    source = tmp_path / "granite"
    to_hybrid(tiny_model("llama", **TINY), [True, False, False, True], "copy", "granitemoehybrid", "t").save_pretrained(
        source
    )
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(source)
    out = tmp_path / "streaming"
    result = cli("convert", "streaming", source, "-o", out, "--window", "16", "--sinks", "2", "--no-eval")
    assert result.exit_code == 0, result.stderr
    spec = json.loads((out / "config.json").read_text())["streamify_streaming"]
    assert spec["layer_types"] == ["ssm", "sink_window", "sink_window", "ssm"]
    check = cli("eval", out, "--check", "equivalence", "--format", "json")
    assert check.exit_code == 0, check.stderr
    assert json.loads(check.stdout)["equivalence"]["max_rel_diff"] < 1e-4


def test_a_granite_without_rotary_positions_is_refused_by_convert_streaming(tmp_path, tokenizer_dir, cli):
    """IBM's Granite 4.0-H default: no positions in the attention, so no sink + window re-indexing (exit 3)."""
    from conftest import TINY

    source = tmp_path / "nope"
    hybrid = to_hybrid(tiny_model("llama", **TINY), [True, False, False, True], "copy", "granitemoehybrid", "t")
    hybrid.config.position_embedding_type = None
    AutoModelForCausalLM.from_config(hybrid.config).save_pretrained(source)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(source)
    result = cli("convert", "streaming", source, "-o", tmp_path / "out", "--window", "16", "--no-eval")
    assert result.exit_code == 3 and "no positions in its attention" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_half_precision_source_is_refused_before_any_work(tiny_models, tmp_path, cli):
    result = cli("distill", "hybrid", tiny_models["llama"], "-o", tmp_path / "out", "--dtype", "bf16")
    assert result.exit_code == 2
    assert "--dtype fp32" in result.stderr and not (tmp_path / "out").exists()


def test_kl_guided_picks_the_layers_whose_attention_matters_least():
    from conftest import TINY

    teacher = tiny_model("llama", **TINY)
    with torch.no_grad():
        for index in (0, 2):
            teacher.model.layers[index].self_attn.o_proj.weight.mul_(1e-3)
    layers, costs = kl_guided_layers(teacher, _ids(64)[:, :64], 2, SILENT)
    assert layers == [0, 2] and set(costs) == {0, 1, 2, 3}
    assert max(costs[0], costs[2]) < min(costs[1], costs[3])


def test_killed_alignment_resumes_to_the_same_weights(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    params = HybridParams(
        mamba_layers="1", align_tokens=8 * 64, tokens=0, seq_len=64, grad_accum=1, checkpoint_every=2, eval_blocks=1
    )

    def run() -> dict[str, torch.Tensor]:
        ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:pydoc")
        checkpoint = get_stage("distill.hybrid").run(load_checkpoint(str(tiny_models["llama"])), params, ctx)
        return checkpoint.model.state_dict(), ctx.metrics

    whole, _ = run()
    original = hybrid_stage.train
    monkeypatch.setattr(hybrid_stage, "train", killed_at_call(original, 5))  # at step 5
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(hybrid_stage, "train", original)
    resumed, metrics = run()
    assert metrics["align_resumed_from_step"] == 4
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize(
    ("model", "args", "code", "message"),
    [
        ("llama", ["--mamba-layers", "0,9"], 2, "--mamba-layers: layer index 9 is out of range"),
        ("llama", ["--mamba-layers", "every:1"], 2, "replacing all 4 layers leaves no attention"),
        ("llama", ["--mamba-layers", "kl-guided:4"], 2, "N must be a whole number from 1 to 3"),
        ("gpt2", [], 3, "hybrid distillation rewrites Llama-family decoders"),
        ("qwen3", [], 3, "hybrid distillation rewrites Llama-family decoders"),
        ("mistral", [], 3, "attends through a sliding window"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_artifact(tiny_models, tmp_path, cli, model, args, code, message):
    out = tmp_path / "out"
    result = cli("distill", "hybrid", tiny_models[model], "-o", out, *args, "--tokens", "0", "--align-tokens", "0")
    assert result.exit_code == code, result.stderr
    assert message in " ".join(result.stderr.split())
    assert not out.exists()
