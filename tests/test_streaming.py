"""Streaming conversion and runtime: sink + window attention, bounded cache, native export, healing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamify
from streamify.converters.native import to_native
from streamify.distill.trainer import TrainParams, train
from streamify.errors import UsageError
from streamify.eval.perplexity import perplexity
from streamify.eval.reference import streamingllm_logits
from streamify.eval.streaming import stream_ids
from streamify.progress import Progress
from streamify.runtime import disable_streaming, enable_streaming, make_spec, new_cache

ARCHS = ["llama", "qwen2", "mistral", "qwen3", "gemma"]
NATIVE_ARCHS = ["llama", "qwen2", "mistral", "qwen3"]


def _load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 384, (1, n), generator=torch.Generator().manual_seed(seed))


def _chunked(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    cache = new_cache(model)
    pieces = [
        model(ids[:, i : i + chunk], past_key_values=cache, use_cache=True).logits
        for i in range(0, ids.shape[1], chunk)
    ]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("full_layers", ["none", "1,2"])
@torch.inference_mode()
def test_chunked_cache_equals_masked_forward(tiny_models, arch, full_layers):
    """After the window has rolled 20 times, chunks of 1, 7 and 64 give the masked full forward's logits.

    The bound is relative to the logits' scale: 2e-6, where fp32 summation order
    leaves at most 3.8e-7 on these models (measured over the five architectures)
    and a mask fault (full attention instead of sinks + window) 1e-2 or more.
    fp64 does not make the comparison exact: transformers' RMSNorm and rotary
    tables compute in fp32 even for an fp64 model (1.5e-7 measured).
    """
    model = _load(tiny_models[arch])
    enable_streaming(model, make_spec(sinks=3, window=8, full_layers=full_layers, num_layers=4))
    ids = _ids(3 + 8 * 20)
    reference = model(ids).logits
    scale = reference.abs().max().item()
    for chunk in (1, 7, 64):
        assert (_chunked(model, ids, chunk) - reference).abs().max().item() <= 2e-6 * scale, chunk
    disable_streaming(model)
    assert (model(ids).logits - reference).abs().max().item() > 1e-2 * scale  # what a mask fault looks like


@torch.inference_mode()
def test_a_long_stream_keeps_its_keys_in_a_moving_frame(tiny_llama):
    """Keys are rotated once, in a frame that a window layer moves up as the stream runs: after 1,200 tokens
    one at a time the logits still equal the masked forward's, the frame sits near the stream's end and the
    rotary table has not grown with the stream."""
    model = _load(tiny_llama)
    ctl = enable_streaming(model, make_spec(sinks=3, window=8, full_layers="none", num_layers=4))
    ids = _ids(1200)
    cache = new_cache(model)
    logits = torch.cat([model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(1200)], dim=1)
    assert all(1200 - 2 * 8 <= layer.frame < 1200 for layer in cache.layers)
    assert max(table[0].shape[0] for table in ctl._tables.values()) == 256  # the first table's size
    reference = model(ids).logits
    assert (logits - reference).abs().max().item() <= 2e-6 * reference.abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("full_layers", ["none", "1,2"])
@torch.inference_mode()
def test_runtime_equals_the_independent_streamingllm_reference(tiny_models, arch, full_layers):
    """3 sinks, a window of 8 rolled 12 times: the runtime gives the stock model's logits under StreamingLLM's cache.

    The reference decodes with transformers' own attention and rotary code, one
    token at a time, over exactly the tokens StreamingLLM keeps. Measured: at
    most 3.5e-7 of the logits' scale over the five architectures; full
    attention instead of sinks + window differs by 2e-2 or more.
    """
    model = _load(tiny_models[arch])
    spec = make_spec(sinks=3, window=8, full_layers=full_layers, num_layers=4)
    ids = _ids(3 + 8 * 12)[0]
    reference = streamingllm_logits(model, ids, spec)
    scale = reference.abs().max().item()
    enable_streaming(model, spec)
    for chunk in (1, 5):
        assert (_chunked(model, ids[None], chunk)[0] - reference).abs().max().item() <= 2e-6 * scale, chunk
    with pytest.raises(UsageError, match="stock model"):
        streamingllm_logits(model, ids, spec)


@torch.inference_mode()
def test_reference_catches_a_sink_position_fault(tiny_llama, monkeypatch):
    """A runtime that places the sinks one position further than StreamingLLM fails the check by far."""
    model = _load(tiny_llama)
    spec = make_spec(sinks=3, window=8, full_layers="none", num_layers=4)
    ids = _ids(3 + 8 * 6)[0]
    reference = streamingllm_logits(model, ids, spec)
    monkeypatch.setattr(type(spec), "capacity", property(lambda self: self.sinks + self.window))
    enable_streaming(model, spec)
    assert (_chunked(model, ids[None], 1)[0] - reference).abs().max().item() > 1e-3 * reference.abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_short_sequence_equals_the_stock_model(tiny_models, arch):
    """Before anything is evicted, streaming attention is exactly the stock model's full attention."""
    model = _load(tiny_models[arch])
    ids = _ids(40)
    stock = model(ids).logits
    enable_streaming(model, make_spec(sinks=4, window=36, full_layers="none", num_layers=4))
    assert (model(ids).logits - stock).abs().max().item() <= 1e-5
    assert (_chunked(model, ids, 5) - stock).abs().max().item() <= 1e-5
    disable_streaming(model)
    assert torch.equal(model(ids).logits, stock)


@pytest.mark.parametrize("arch", NATIVE_ARCHS)
@torch.inference_mode()
def test_no_sinks_equals_transformers_sliding_window(tiny_models, arch):
    """With 0 sinks our window is transformers' own sliding window (same keys, same distances)."""
    model = _load(tiny_models[arch])
    spec = make_spec(sinks=0, window=16, full_layers="2", num_layers=4)
    native = to_native(model, spec)
    ids = _ids(100)
    enable_streaming(model, spec)
    assert (model(ids).logits - native(ids).logits).abs().max().item() <= 1e-4
    with_sinks = make_spec(sinks=4, window=16, full_layers="2", num_layers=4)
    enable_streaming(model, with_sinks)
    assert (model(ids).logits - native(ids).logits).abs().max().item() > 1e-2  # sinks do change the output


@torch.inference_mode()
def test_cache_bytes_stay_constant_over_a_long_stream(tiny_llama):
    model = _load(tiny_llama)
    enable_streaming(model, make_spec(sinks=4, window=16, full_layers="none", num_layers=4))
    cache = new_cache(model)
    sizes = []
    for token in _ids(10 * (4 + 16))[0]:
        model(token.view(1, 1), past_key_values=cache, use_cache=True)
        sizes.append(cache.nbytes())
    per_token = 4 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head_dim x fp32 bytes
    assert max(sizes) == sizes[-1] == (4 + 16 - 1) * per_token
    assert len(set(sizes[4 + 16 :])) == 1
    assert cache.get_seq_length() == 200


@torch.inference_mode()
def test_generate_uses_the_bounded_cache(tmp_path, tiny_llama, cli):
    """A streaming artifact's generate equals greedy decoding under the masked forward."""
    out = tmp_path / "stream"
    result = cli("convert", "streaming", tiny_llama, "-o", out, "--sinks", "2", "--window", "8", "--no-eval")
    assert result.exit_code == 0, result.stderr
    model, _ = streamify.load(str(out))
    model.generation_config.eos_token_id = None
    prompt = _ids(5)
    generated = model.generate(prompt, max_new_tokens=30, do_sample=False)
    tokens = prompt
    for _ in range(30):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_generate_runs_any_causal_lm_and_says_which_runtime(tiny_llama, cli):
    """A plain checkpoint generates with transformers' cache (what plain greedy generate gives); --kv-bits,
    which only the streaming cache has, is refused."""
    result = cli("generate", tiny_llama, "--prompt", "def f(x):", "--max-new-tokens", "12", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["runtime"].startswith("transformers") and data["cache_bytes"] > 0
    model, tokenizer = streamify.load(str(tiny_llama))
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert data["new_tokens"] == len(plain) > 0
    assert data["text"] == tokenizer.decode(plain, skip_special_tokens=True)
    refused = cli("generate", tiny_llama, "--prompt", "x", "--kv-bits", "4")
    assert refused.exit_code == 2 and "this model does not stream" in refused.stderr


def test_convert_streaming_records_the_spec(tmp_path, tiny_models, cli):
    out = tmp_path / "s"
    args = ["--sinks", "2", "--window", "8", "--full-layers", "every:2", "--format", "json", *["--no-eval"]]
    result = cli("convert", "streaming", tiny_models["qwen2"], "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["streamify_streaming"]["layer_types"] == ["sink_window", "full", "sink_window", "full"]
    manifest = json.loads((out / "streamify.json").read_text())
    assert manifest["streaming"]["sinks"] == 2 and manifest["streaming"]["full_layers"] == [1, 3]
    assert "Streaming" in (out / "README.md").read_text()
    check = cli("eval", out, "--check", "equivalence", "--tokens", "60", "--format", "json")
    assert check.exit_code == 0, check.stderr
    assert json.loads(check.stdout)["equivalence"]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(("arch", "native_class"), [("llama", "MinistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
@torch.inference_mode()
def test_native_export_runs_the_same_model_in_plain_transformers_and_streamify(
    tmp_path, tiny_models, cli, arch, native_class
):
    """Native runtimes have no sinks, so the export has none: plain transformers and streamify.load() compute
    the same function over a stream that rolls the window, and the card reports its measured perplexity ratio
    to full attention (recomputed here with plain transformers)."""
    out = tmp_path / "native"
    args = ["--window", "16", "--full-layers", "1", "--export-arch", "native", "--native-check-tokens", "96"]
    result = cli("convert", "streaming", tiny_models[arch], "-o", out, *args, "--no-eval")
    assert result.exit_code == 0, result.stderr
    plain = _load(out)
    assert type(plain).__name__ == native_class
    assert plain.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    ids = _ids(80)
    streaming, _ = streamify.load(str(out))
    assert streaming.streamify_controller.spec.sinks == 0
    assert (plain(ids).logits - _chunked(streaming, ids, 7)).abs().max().item() <= 1e-5
    record = json.loads((out / "streamify.json").read_text())["streaming"]
    assert record["sinks"] == 0 and "no attention sinks" in record["native_note"]
    check = record["native_check"]
    held_out = stream_ids(AutoTokenizer.from_pretrained(out), "builtin:pydoc", 96)[None]
    full = perplexity(_load(tiny_models[arch]), held_out)["perplexity"]
    assert check["tokens"] == 96 and abs(check["full_attention_perplexity"] - full) < 1e-3
    assert abs(check["perplexity"] - perplexity(plain, held_out)["perplexity"]) < 1e-3
    assert check["ratio"] == pytest.approx(check["perplexity"] / full, rel=1e-4)
    assert f"ratio {check['ratio']:.3f}" in (out / "README.md").read_text()
    checked = cli("eval", out, "--check", "equivalence", "--tokens", "60", "--format", "json")  # sliding layers
    assert checked.exit_code == 0, checked.stderr
    assert json.loads(checked.stdout)["equivalence"]["max_rel_diff"] <= 2e-6


def test_native_export_refuses_sinks_it_cannot_run(tmp_path, tiny_llama, cli):
    args = ["--sinks", "4", "--window", "16", "--export-arch", "native", "--no-eval"]
    result = cli("convert", "streaming", tiny_llama, "-o", tmp_path / "n", *args)
    assert result.exit_code == 2 and "without attention sinks" in result.stderr and "same" in result.stderr
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--window", "0"], 2, "'--window': Input should be greater than or equal to 1"),
        (["--sinks", "9", "--window", "8"], 2, "sinks (9) is larger than window (8)"),
        (["--full-layers", "4"], 2, "out of range"),
        (["--full-layers", "every:x"], 2, "not a layer index"),
    ],
)
def test_bad_streaming_options(tmp_path, tiny_llama, cli, args, code, message):
    out = tmp_path / "bad"
    result = cli("convert", "streaming", tiny_llama, "-o", out, *args, "--no-eval")
    assert result.exit_code == code and message in result.stderr
    assert not out.exists()


def test_unsupported_architecture_is_refused(tmp_path, tiny_models, cli):
    result = cli("convert", "streaming", tiny_models["gpt2"], "-o", tmp_path / "x", "--no-eval")
    assert result.exit_code == 3 and "'gpt2'" in result.stderr and "supported" in result.stderr


def test_stream_command_reports_flat_cache(tmp_path, tiny_llama, cli):
    out = tmp_path / "s"
    assert cli("convert", "streaming", tiny_llama, "-o", out, "--window", "16", "--no-eval").exit_code == 0
    text = tmp_path / "in.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    result = cli("stream", out, "--input", text, "--chunk", "16", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] > 10 * 20 and report["cache_bytes_max"] == (4 + 16 - 1) * 4 * 2 * 2 * 8 * 4
    missing = cli("stream", out, "--input", tmp_path / "nope.txt")
    assert missing.exit_code == 3 and "nope.txt" in missing.stderr


def test_training_resumes_to_the_same_weights(tmp_path):
    """A run interrupted after a checkpoint resumes and ends with exactly the uninterrupted run's weights."""
    blocks = torch.randint(0, 50, (12, 8), generator=torch.Generator().manual_seed(0))
    params = TrainParams(steps=6, lr=1e-2, grad_accum=2, warmup_steps=1, checkpoint_every=2)

    def fresh():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))

    def loss_of(model):
        return lambda batch: torch.nn.functional.cross_entropy(
            model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()
        )

    whole = fresh()
    train(whole, blocks, loss_of(whole), params, seed=3)

    calls = {"n": 0}
    broken = fresh()

    def dies_at_step_5(batch):
        calls["n"] += 1
        if calls["n"] > 4 * params.grad_accum:
            raise KeyboardInterrupt
        return loss_of(broken)(batch)

    with pytest.raises(KeyboardInterrupt):
        train(broken, blocks, dies_at_step_5, params, seed=3, checkpoint_dir=tmp_path)
    resumed = fresh()
    result = train(resumed, blocks, loss_of(resumed), params, seed=3, checkpoint_dir=tmp_path)
    assert result.resumed_from == 4
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not tmp_path.exists()


def test_checkpoint_for_other_parameters_is_reported_not_silently_dropped(tmp_path):
    """A checkpoint whose parameter names differ is not resumed, and the result and log say so."""
    blocks = torch.randint(0, 50, (12, 8), generator=torch.Generator().manual_seed(0))
    params = TrainParams(steps=4, lr=1e-2, grad_accum=1, warmup_steps=1, checkpoint_every=2)
    (tmp_path / "step-000002").mkdir()
    record = {"step": 2, "losses": [1.0, 1.0], "names": ["other.weight"], "processes": 1}
    (tmp_path / "step-000002" / "streamify_train.json").write_text(json.dumps(record))
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    logged = []

    class Log(Progress):
        def log(self, message: str) -> None:
            logged.append(message)

    def loss(batch):
        return torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    result = train(model, blocks, loss, params, seed=0, checkpoint_dir=tmp_path, progress=Log())
    assert result.discarded_checkpoint and result.resumed_from == 0 and len(result.losses) == 4
    assert any("not resumed" in line for line in logged)


def test_training_half_precision_weights_is_refused():
    """Full fine-tuning of bf16 weights would lose AdamW's small updates: refused, with the fp32 + autocast way."""
    from streamify.errors import UsageError

    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)).to(torch.bfloat16)
    blocks = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match="bfloat16 weights in place") as refused:
        train(model, blocks, lambda batch: model(batch).float().mean(), TrainParams(steps=2), seed=0)
    assert "--dtype fp32" in refused.value.hint


def test_a_non_finite_loss_stops_training_before_it_changes_the_weights():
    """Step 3's loss is NaN: the run stops with exit 2's error naming the step and the learning rate, and the
    weights are those after step 2 (finite), not NaN."""
    from streamify.errors import UsageError

    blocks = torch.randint(0, 50, (12, 8), generator=torch.Generator().manual_seed(0))
    params = TrainParams(steps=4, lr=1e-2, grad_accum=1, warmup_steps=0, schedule="constant")

    def fresh():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))

    def loss_of(model, nan_at: int = 0):
        calls = {"n": 0}

        def loss(batch):
            calls["n"] += 1
            value = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            return value * float("nan") if calls["n"] == nan_at else value

        return loss

    two_steps = fresh()
    train(two_steps, blocks, loss_of(two_steps), params.model_copy(update={"steps": 2}), seed=0)
    diverged = fresh()
    with pytest.raises(UsageError, match="loss of step 3 is nan") as stopped:
        train(diverged, blocks, loss_of(diverged, nan_at=3), params, seed=0)
    assert "learning rate (it is 0.01" in stopped.value.hint
    for a, b in zip(two_steps.parameters(), diverged.parameters(), strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights():
    starts = torch.randint(0, 50, (12, 1), generator=torch.Generator().manual_seed(0))
    blocks = (starts + torch.arange(8)) % 50  # next token = this one + 1: learnable
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    seen = []

    def loss_fn(batch):
        logits = model(batch[:, :-1])
        seen.append(logits.dtype)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    params = TrainParams(steps=40, lr=5e-2, grad_accum=1, warmup_steps=0, autocast="bf16")
    result = train(model, blocks, loss_fn, params, seed=0)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert result.losses[-1] < 0.9 * result.losses[0]
    seen.clear()
    train(model, blocks, loss_fn, params.model_copy(update={"autocast": "off", "steps": 1}), seed=0)
    assert seen == [torch.float32]


def test_healing_lowers_heldout_kl(tmp_path, tiny_llama, cli, monkeypatch):
    """convert streaming --heal-steps: LoRA distillation from the full-attention original, merged."""
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "healed"
    args = ["--sinks", "2", "--window", "8", "--heal-steps", "30", "--heal-lr", "3e-3", "--heal-seq-len", "64"]
    result = cli("convert", "streaming", tiny_llama, "-o", out, *args, "--no-eval", "--format", "json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["heal_steps"] == 30 and metrics["heal_seq_len"] == 64
    assert metrics["heldout_kl_after"] < metrics["heldout_kl_before"], metrics
    healed, _ = streamify.load(str(out))
    assert not any("lora" in name for name in healed.state_dict())
    original = _load(tiny_llama)
    changed = [n for n, p in original.state_dict().items() if not torch.equal(p, healed.state_dict()[n])]
    assert any("q_proj" in n for n in changed)


@torch.inference_mode()
def test_two_streams_share_one_model(tiny_llama):
    """Interleaved calls with two caches give each stream the logits it gets alone."""
    model = _load(tiny_llama)
    enable_streaming(model, make_spec(sinks=2, window=8, full_layers="none", num_layers=4))
    first, second = _ids(40, seed=1), _ids(40, seed=2)
    alone = [_chunked(model, ids, 4) for ids in (first, second)]
    caches = [new_cache(model), new_cache(model)]
    outs: list[list[torch.Tensor]] = [[], []]
    for start in range(0, 40, 4):
        for k, ids in enumerate((first, second)):
            outs[k].append(model(ids[:, start : start + 4], past_key_values=caches[k], use_cache=True).logits)
    for k in range(2):
        assert torch.equal(torch.cat(outs[k], dim=1), alone[k])


def test_healing_learns_from_the_model_itself_not_a_copy(tiny_llama):
    """With LoRA, the teacher is the student with its adapters off and full attention: the original's logits,
    although the adapters change the student's, and the student streams again after each teacher call."""
    from streamify.distill.heal import _teacher_logits
    from streamify.distill.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        enable_streaming(model, make_spec(2, 8, "none", model.config.num_hidden_layers))
        trainee = add_lora(model, 4, 8, ["q_proj", "v_proj"])
        for name, param in trainee.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)  # adapters that change the output
        assert not torch.allclose(trainee(ids).logits, reference, atol=1e-3)
        teacher = _teacher_logits(None, model, trainee)(ids)
    assert torch.allclose(teacher, reference, atol=1e-5)
    assert model.streamify_controller is not None and model.config._attn_implementation == "streamify_streaming"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.inference_mode()
def test_whole_sequence_by_query_blocks_equals_the_reference(tiny_models, arch, monkeypatch):
    """The training forward attends in blocks of queries over the keys each block can see (here blocks of 16,
    with 3 sinks, a window of 8 and two full-attention layers): the independent reference's logits."""
    from streamify.runtime import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    model = _load(tiny_models[arch])
    spec = make_spec(sinks=3, window=8, full_layers="1,2", num_layers=4)
    ids = _ids(3 + 8 * 12)[0]
    reference = streamingllm_logits(model, ids, spec)
    enable_streaming(model, spec)
    scale = reference.abs().max().item()
    assert (model(ids[None]).logits[0] - reference).abs().max().item() <= 2e-6 * scale


def _saved_bytes(model, length: int) -> int:
    """Bytes autograd keeps for the backward of one training forward of ``length`` tokens (each storage once)."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(_ids(length)).logits.float().logsumexp(-1).mean()
    loss.backward()
    return sum(storages.values())


def test_training_memory_grows_linearly_at_window_2048(tiny_llama):
    """Healing under 4 sinks + a window of 2,048: what the backward keeps grows by the same amount from 4,096 to
    6,144 tokens as from 6,144 to 8,192 (measured: 122.37 MB each), where attention scores over the whole sequence
    would grow by 1.4x more each time, and by 1 GiB a layer at 8,192 tokens alone (4 heads, fp32)."""
    model = _load(tiny_llama)
    enable_streaming(model, make_spec(sinks=4, window=2048, full_layers="none", num_layers=4))
    kept = [_saved_bytes(model, length) for length in (4096, 6144, 8192)]
    first, second = kept[1] - kept[0], kept[2] - kept[1]
    assert abs(second / first - 1) < 0.05, kept
    assert kept[2] < 2**30, kept


def _checkpointing(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_llama):
    """Recomputing activations in the backward changes memory, not the result; it is off again afterwards."""
    blocks = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(0))
    results, seen = [], []
    for checkpointing in (False, True):
        model = _load(tiny_llama)
        enable_streaming(model, make_spec(sinks=2, window=8, full_layers="none", num_layers=4))

        def loss_fn(batch, model=model):
            seen.append(_checkpointing(model))
            return torch.nn.functional.cross_entropy(model(batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

        params = TrainParams(steps=3, lr=1e-2, grad_accum=1, warmup_steps=0, gradient_checkpointing=checkpointing)
        train(model, blocks, loss_fn, params, seed=0)
        assert not _checkpointing(model)
        results.append(model.state_dict())
    assert seen == [False] * 3 + [True] * 3
    for name, value in results[0].items():
        assert torch.allclose(results[1][name], value, atol=1e-6), name


def test_kl_to_the_teacher_in_pieces_equals_the_whole_sequence_formula():
    """KL(teacher || student) over 3,000 positions (three pieces of 1,024, the last short), value and gradient,
    equals torch's kl_div of the whole log-softmaxes (batchmean, T²)."""
    from streamify.distill.losses import kl_to_teacher

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 1500, 64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 1500, 64, generator=generator)
    ours = kl_to_teacher(student, teacher, temperature=2.0)
    (ours_grad,) = torch.autograd.grad(ours, student)
    logs = [torch.nn.functional.log_softmax(x.reshape(-1, 64) / 2.0, dim=-1) for x in (student, teacher)]
    whole = torch.nn.functional.kl_div(*logs, log_target=True, reduction="batchmean") * 4.0
    (whole_grad,) = torch.autograd.grad(whole, student)
    assert torch.allclose(ours, whole, rtol=1e-5)
    assert torch.allclose(ours_grad, whole_grad, atol=1e-8)
