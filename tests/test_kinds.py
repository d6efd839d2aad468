"""Model kinds: one tiny model of each loads, is evaluated by its kind's measure, and goes through every
stage that applies to it; the stages that do not apply refuse (exit 3) before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import write_clips
from streamify.codec.container import CONTAINER_NAME
from streamify.codec.container import CONTAINER_SUFFIX as SUFFIX
from streamify.eval.report import EvalSpec, eval_data
from streamify.io.load import load_checkpoint
from streamify.kinds.speech import decoder_prompt, greedy_decode, normalize
from streamify.progress import SILENT

TEXT_ONLY_STAGES = ("convert.streaming", "distill.heal", "prune.depth", "quantize.int4")
REQUIRED = {"prune.depth": ["--remove", "1"]}


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips"), ["hello world", "the cat sat", "streaming speech now"])


def _eval_keys(kind: str, clips) -> list[str]:
    return {
        "speech-seq2seq": [f"eval.data={clips}", "eval.max_items=2"],
        "encoder": ["eval.seq_len=64", "eval.max_tokens=256"],
        "denoiser": ["eval.max_items=3"],
    }[kind]


def test_inspect_names_the_kind_and_the_stages_that_apply(cli, tiny_kinds, tiny_llama):
    assert _json(cli("inspect", tiny_llama, "--format", "json"))["kind"] == "causal-lm"
    for kind, folder in tiny_kinds.items():
        facts = _json(cli("inspect", folder, "--format", "json"))
        assert facts["kind"] == kind
        video = {"convert.causal_video", "distill.ode_init", "distill.self_forcing"}
        causal = {"convert.causal"} if kind in ("speech-seq2seq", "encoder") else video
        assert set(facts["applicable_stages"]) == {"convert.dtype", "quantize.entropy", *causal}
        for stage in TEXT_ONLY_STAGES:
            assert f"this model's kind is {kind}" in facts["other_stages"][stage]


@pytest.mark.parametrize("kind", ["speech-seq2seq", "encoder", "denoiser"])
def test_each_kind_goes_through_the_stages_that_apply(cli, tiny_kinds, clips, tmp_path, kind):
    """bf16, then lossless coding of the bf16 artifact; both reload to the same tensors; each eval uses the kind's
    measure; a stage for text decoders refuses at --dry-run with exit 3 and writes nothing."""
    source = tiny_kinds[kind]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {source}\nstages: [{{convert.dtype: {{dtype: bf16}}}}]\neval: {{}}\n")
    run = _json(cli("run", recipe, f"output={tmp_path / 'bf16'}", *_eval_keys(kind, clips), "--format", "json"))
    report = run["eval"]
    assert report["kind"] == kind
    if kind == "speech-seq2seq":
        assert report["wer"] >= 0 and report["clips"] == 2 and report["nll"] > 0
    elif kind == "encoder":  # judged by closeness to the source: bf16 moves it a little, not much
        assert 0.99 < report["cosine_to_reference_min"] < 1 - 1e-9
    else:
        assert report["denoising_loss"] > 0 and 0 < report["relative_error_to_reference"] < 0.05
    bf16 = load_checkpoint(str(tmp_path / "bf16"))
    original = load_checkpoint(str(source)).model.state_dict()
    kept = set(run["stages"][0]["metrics"].get("kept_fp32", []))  # what the class keeps in fp32 (Wan's modulation)
    assert bool(kept) == (kind == "denoiser")
    for name, tensor in bf16.model.state_dict().items():
        dtype = torch.float32 if name in kept else torch.bfloat16
        assert tensor.dtype == dtype and torch.equal(tensor, original[name].to(dtype)), name
    if kind == "speech-seq2seq":
        assert bf16.processor is not None and bf16.processor.sampling_rate == 16000

    coded = tmp_path / "coded"
    result = cli("quantize", "entropy", tmp_path / "bf16", "-o", coded, "--no-eval", "--format", "json")
    assert result.exit_code == 0, result.stderr
    (container,) = [p.name for p in coded.glob("*.safetensors")]  # one container, named after the saved file
    assert container == CONTAINER_NAME or (kind == "denoiser" and container == "diffusion_pytorch_model" + SUFFIX)
    for name, tensor in load_checkpoint(str(coded)).model.state_dict().items():
        assert torch.equal(tensor, bf16.model.state_dict()[name]), name

    for stage in TEXT_ONLY_STAGES:
        group, action = stage.split(".")
        refused = cli(group, action, source, "-o", tmp_path / stage, *REQUIRED.get(stage, []), "--no-eval", "--dry-run")
        assert refused.exit_code == 3, (stage, refused.stderr)
        assert f"applies to causal-lm models; this model's kind is {kind}" in refused.stderr
        assert not (tmp_path / stage).exists()


def test_speech_wer_is_zero_on_the_models_own_transcripts(cli, tiny_kinds, tmp_path, clips):
    """Greedy decoding equals transformers' own generate; scoring the model against its own transcripts gives WER 0,
    against other words a WER above 0."""
    checkpoint = load_checkpoint(str(tiny_kinds["speech-seq2seq"]))
    model = checkpoint.model
    data = eval_data(checkpoint, EvalSpec(data=str(clips)))
    own = []
    for features in data["features"]:
        encoded = model.get_encoder()(input_features=features[None])
        ours = greedy_decode(model, encoded, decoder_prompt(model), model.config.eos_token_id, 12)
        reference = model.generate(
            input_features=features[None], language="en", task="transcribe", max_new_tokens=12, do_sample=False
        )[0].tolist()
        assert ours == [t for t in reference if t not in decoder_prompt(model)][:12], "greedy != generate"
        own.append(checkpoint.tokenizer.decode(ours, skip_special_tokens=True))
    assert all(normalize(text) for text in own), own  # words to score, not only punctuation
    mine = write_clips(tmp_path / "own", own)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_kinds['speech-seq2seq']}\nstages: []\n")
    keys = [f"output={tmp_path / 'out'}", f"eval.data={mine}", "eval.max_new_tokens=12"]
    report = _json(cli("run", recipe, *keys, "--format", "json"))["eval"]
    assert report["clips"] == 3
    assert report["wer"] == 0.0
    other = _json(cli("eval", tiny_kinds["speech-seq2seq"], "--data", clips, "--format", "json"))["model"]
    assert other["wer"] > 0


def test_speech_data_defaults_resampling_and_problems(cli, tiny_kinds, tmp_path):
    model = tiny_kinds["speech-seq2seq"]
    default = cli("eval", model, "--max-items", "4", "--format", "json")
    assert default.exit_code == 0, default.stderr  # no --data: builtin:speech's held-out clips
    assert _json(default)["model"]["data"] == "builtin:speech" and _json(default)["model"]["clips"] == 4
    slow = write_clips(tmp_path / "8k", ["hello"], rate=8000)
    result = cli("eval", model, "--data", slow, "--format", "json")
    assert result.exit_code == 0, result.stderr  # resampled to 16 kHz with soxr, and the report says so
    assert _json(result)["model"]["resampled_from_hz"] == [8000]
    (slow / "clip00.txt").unlink()
    result = cli("eval", model, "--data", slow)
    assert result.exit_code == 3 and "clip00.txt is missing" in result.stderr


def test_encoder_cosine_is_one_against_itself(cli, tiny_kinds):
    args = ["--seq-len", "64", "--max-tokens", "256", "--format", "json"]
    result = _json(cli("eval", tiny_kinds["encoder"], "--vs", tiny_kinds["encoder"], *args))
    assert result["model"]["cosine_to_reference_min"] > 1 - 1e-12
    too_long = cli("eval", tiny_kinds["encoder"], "--seq-len", "512")
    assert too_long.exit_code == 2 and "exceed the model's 256 positions" in too_long.stderr


def test_denoising_loss_matches_the_diffusers_model_called_directly(tiny_kinds):
    """The flow-matching loss recomputed here from the eval's own samples with the plain diffusers model."""
    from diffusers import WanTransformer3DModel

    checkpoint = load_checkpoint(str(tiny_kinds["denoiser"]))
    spec = EvalSpec(max_items=3)
    samples = eval_data(checkpoint, spec)
    metrics, _ = checkpoint.kind.score(checkpoint, samples, spec, SILENT)
    plain = WanTransformer3DModel.from_pretrained(tiny_kinds["denoiser"]).eval()
    losses = []
    with torch.no_grad():
        for s in samples:
            noisy = (1 - s["sigma"]) * s["latents"] + s["sigma"] * s["noise"]
            out = plain(noisy, torch.tensor([1000 * s["sigma"]]), s["condition"], return_dict=False)[0]
            losses.append(F.mse_loss(out, s["noise"] - s["latents"]).item())
    assert metrics["denoising_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert len({round(s["sigma"], 6) for s in samples}) == 3  # seeded, but not one level for all


def test_a_model_of_no_kind_is_refused_by_eval(cli, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    facts = _json(cli("inspect", tmp_path / "cls", "--format", "json"))
    assert facts["kind"] is None and set(facts["applicable_stages"]) == {"convert.dtype", "quantize.entropy"}
    result = cli("eval", tmp_path / "cls")
    assert result.exit_code == 3 and "none of the model kinds streamify handles" in result.stderr


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["stream", "--input", "-"], ["eval", "--stream"]])
def test_the_streaming_runtime_refuses_other_kinds(cli, tiny_kinds, command):
    result = cli(command[0], tiny_kinds["encoder"], *command[1:])
    assert result.exit_code == 3 and "runs causal-lm models; this model's kind is encoder" in result.stderr
