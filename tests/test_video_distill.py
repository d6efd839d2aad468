"""ODE initialisation, self-forcing distillation and video generation of block-causal Wan students."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from PIL import Image
from safetensors.torch import load_file, save_file

import streamify.distill.self_forcing as self_forcing_stage
from conftest import Cli, killed_at_call
from streamify.cli.video import video_request
from streamify.distill.trainer import Companion, TrainParams, train
from streamify.errors import UsageError
from streamify.io.load import load_checkpoint
from streamify.pipeline.registry import StageContext, get_stage
from streamify.progress import SILENT
from streamify.runtime.causal_video import TIMESTEPS_KEY, VideoSpec, enable_causal_video
from streamify.runtime.video_generate import VideoRequest, generate_video
from streamify.runtime.video_sampling import rollout

SHAPES = "builtin:shapes"


def pixel_wan(seed: int = 0, channels: int = 3, text_dim: int = 24) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=128,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def wans(tmp_path_factory):
    """A bidirectional pixel Wan teacher, its block-causal student (chunks of 2 frames) and one in latents."""
    root = tmp_path_factory.mktemp("wans")
    pixel_wan().save_pretrained(root / "teacher")
    pixel_wan(channels=4).save_pretrained(root / "latent")
    result = Cli()("convert", "causal-video", root / "teacher", "-o", root / "student", "--chunk-frames", "2")
    assert result.exit_code == 0, result.stderr
    return root


def run_stage(name: str, model, params: dict, data: str = SHAPES):
    stage = get_stage(name)
    ctx = StageContext(device=torch.device("cpu"), seed=0, data=data)
    checkpoint = stage.run(load_checkpoint(str(model)), stage.params(**params), ctx)
    return checkpoint, ctx.metrics


def test_ode_init_regresses_the_teachers_trajectories_and_lowers_its_heldout_loss(wans, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    params = dict(samples=12, heldout_samples=4, teacher_steps=8, keep=[0, 2, 4, 6], steps=30, lr=2e-3, grad_accum=1)
    params.update(frames=4, height=8, width=8, warmup_steps=2)
    _, metrics = run_stage("distill.ode_init", wans / "student", params)
    assert metrics["heldout_loss_after"] < 0.7 * metrics["heldout_loss_before"]
    assert metrics["levels"] == [1.0, 0.75, 0.5, 0.25]
    stored = sorted((tmp_path / "cache" / "trajectories").glob("*/train/trajectory-*.safetensors"))
    assert len(stored) == 12 and load_file(stored[0])["states"].shape == (5, 3, 4, 8, 8)
    run_stage("distill.ode_init", wans / "student", {**params, "guidance": 3.0, "steps": 1})
    guided = set((tmp_path / "cache" / "trajectories").iterdir()) - {stored[0].parents[1]}
    assert len(guided) == 1  # guided trajectories are sampled and stored anew, not read from the unguided ones


def stock_guided_velocity(model, x, condition, timestep, guidance: float, negative=None) -> torch.Tensor:
    """Classifier-free guidance from two separate calls of the stock model (condition, then zero tokens or the
    ``negative`` prompt's states)."""
    unconditioned = torch.zeros_like(condition) if negative is None else negative.expand_as(condition)
    conditional, unconditional = (
        model(hidden_states=x, timestep=timestep, encoder_hidden_states=c)[0] for c in (condition, unconditioned)
    )
    return unconditional + guidance * (conditional - unconditional)


@pytest.mark.parametrize("use_cache", [False, True])
def test_ode_init_under_several_processes_needs_the_others_trajectories(wans, tmp_path, monkeypatch, use_cache):
    """As process 0 of 2 whose partner never writes its share: refused clearly (cache off: before sampling;
    cache on: once the partner's files do not show up)."""
    import types

    import streamify.distill.ode_init as ode_init

    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    state = types.SimpleNamespace(process_index=0, num_processes=2, wait_for_everyone=lambda: None)
    monkeypatch.setattr(ode_init, "launched_processes", lambda: 2)
    monkeypatch.setattr(ode_init, "process_state", lambda device: state)
    monkeypatch.setattr(ode_init, "SHARED_FILE_WAIT_S", 0)
    stage = get_stage("distill.ode_init")
    params = stage.params(samples=4, heldout_samples=2, teacher_steps=2, keep=[0], frames=2, height=4, width=4)
    ctx = StageContext(device=torch.device("cpu"), seed=0, data=SHAPES, use_cache=use_cache)
    message = "not in" if use_cache else "cache, which is off"
    with pytest.raises(UsageError, match=message):
        stage.run(load_checkpoint(str(wans / "student")), params, ctx)
    sampled = sorted(p.name for p in (tmp_path / "cache").rglob("trajectory-*.safetensors"))
    assert sampled == (["trajectory-000000.safetensors"] * 2 + ["trajectory-000002.safetensors"] if use_cache else [])


@pytest.mark.parametrize(("guidance", "negative"), [(1.0, False), (3.0, False), (3.0, True)])
def test_ode_trajectories_are_the_teachers_own_euler_samples(wans, tmp_path, monkeypatch, guidance, negative):
    """The stored states, read back on a second run, are the stock bidirectional model's (guided) Euler steps;
    a negative prompt's states take the place of the zero tokens in the unconditional branch."""
    from streamify.distill.ode_init import OdeInitParams, trajectories
    from streamify.runtime.video_sampling import negative_condition, shifted_sigmas

    params = OdeInitParams(teacher_steps=4, keep=[0, 2], frames=2, height=4, width=4, guidance=guidance)
    teacher = WanTransformer3DModel.from_pretrained(wans / "teacher").eval()
    condition = torch.randn(1, 3, 24)
    tokens = torch.randn(3, 24) if negative else None
    with negative_condition(teacher, tokens):
        states = trajectories(teacher, condition, (3, 2, 4, 4), params, 7, tmp_path, SILENT)
    assert getattr(teacher, "streamify_negative_condition", None) is None  # set for the with only
    unusable = torch.nn.Linear(1, 1)  # a second call reads the stored file: sampling with this would fail
    again = trajectories(unusable, condition, (3, 2, 4, 4), params, 7, tmp_path, SILENT)
    x = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(7 * 1_000_003))
    expected = [x]
    sigmas = shifted_sigmas(4)
    with torch.no_grad():
        for sigma, following in pairwise(sigmas):
            v = stock_guided_velocity(teacher, x, condition, torch.tensor([1000 * sigma]), guidance, tokens)
            x = x + (following - sigma) * v
            expected.append(x)
    assert torch.allclose(states[[0]][0], torch.cat([expected[0], expected[2], expected[4]]), atol=1e-5)
    assert torch.equal(states[[0]], again[[0]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher trained briefly on builtin:shapes (4 frames, downsampled to 8 x 8) and its block-causal student."""
    from streamify.data.shapes import clip_latents, label_condition, shapes_clips
    from streamify.distill.flow_matching import train_on_clips
    from streamify.runtime.causal_video import CONFIG_KEY

    root = tmp_path_factory.mktemp("trained")
    model = pixel_wan()
    clips = shapes_clips("train", 256, 4, 16)
    latents = torch.cat([clip_latents(clip)[..., ::2, ::2] for clip in clips])
    conditions = torch.stack([label_condition(clip, 3, 24) for clip in clips])
    params = TrainParams(steps=150, lr=2e-3, warmup_steps=5, batch_size=16, grad_accum=1)
    result = train_on_clips(model, latents, conditions, params, seed=0)
    assert result.losses[-1] < 0.3 * result.losses[0]  # flow matching learns the clips
    model.save_pretrained(root / "teacher")
    enable_causal_video(model, VideoSpec(2))
    model.register_to_config(**{CONFIG_KEY: model.streamify_video.spec.to_json()})
    model.save_pretrained(root / "student")
    return root


def test_self_forcing_lowers_the_teachers_loss_on_heldout_rollouts(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    params = dict(samples=32, heldout_samples=4, steps=40, lr=3e-4, critic_lr=1e-3, critic_updates=2, grad_accum=1)
    params.update(frames=4, height=8, width=8, condition_tokens=3, timesteps=[1000, 500])
    checkpoint, metrics = run_stage(
        "distill.self_forcing", trained / "student", {**params, "teacher": str(trained / "teacher")}
    )
    assert metrics["heldout_loss_after"] < 0.97 * metrics["heldout_loss_before"]
    assert checkpoint.model.streamify_video.spec.chunk_frames == 2  # still the block-causal student


def test_the_plan_counts_teacher_critic_optimizers_and_average(wans, tmp_path, cli):
    recipe = tmp_path / "sf.yaml"
    recipe.write_text(
        f"model: {wans / 'teacher'}\ndtype: fp32\nstages:\n  - convert.causal_video: {{chunk_frames: 2}}\n"
        "  - distill.self_forcing: {frames: 4, height: 8, width: 8, ema: 0.9}\n"
        "  - distill.ode_init: {frames: 4, height: 8, width: 8}\n"
    )
    result = cli("run", recipe, f"output={tmp_path / 'out'}", "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    params = plan["params"]
    _, self_forcing, ode_init = plan["stages"]
    # fp32: student 4 + gradient and AdamW 12, teacher 4, critic 4 + 12, moving average 4 bytes a parameter
    assert self_forcing["estimate"]["peak_memory_bytes"] == 40 * params
    assert "a critic in fp32" in self_forcing["holds"] and "moving average" in self_forcing["holds"]
    assert ode_init["estimate"]["peak_memory_bytes"] == 16 * params  # it samples with the student's own weights
    assert not (tmp_path / "out").exists()


def test_killed_self_forcing_resumes_to_the_same_weights(wans, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    params = dict(samples=4, heldout_samples=1, steps=6, critic_updates=2, checkpoint_every=2, ema=0.5)
    params.update(frames=4, height=8, width=8, timesteps=[1000, 500], teacher=str(wans / "teacher"))
    whole, metrics = run_stage("distill.self_forcing", wans / "student", params)
    assert len(metrics["dmd_losses"]) == 6 and len(metrics["critic_losses"]) == 6
    original = self_forcing_stage.train
    monkeypatch.setattr(self_forcing_stage, "train", killed_at_call(original, 5))  # at step 5
    with pytest.raises(KeyboardInterrupt):
        run_stage("distill.self_forcing", wans / "student", params)
    monkeypatch.setattr(self_forcing_stage, "train", original)
    resumed, again = run_stage("distill.self_forcing", wans / "student", params)
    assert resumed.model.config[TIMESTEPS_KEY] == [1000, 500]  # generate's default schedule for this student
    request = video_request(resumed.model.config, 4, 8, 8, None, 48, 1.0, 0, False, 1.0)
    assert request.timesteps == (1000, 500)
    assert again["self_forcing_resumed_from_step"] == 4
    assert again["dmd_losses"] == metrics["dmd_losses"] and again["critic_losses"] == metrics["critic_losses"]
    first, second = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_trainer_steps_the_companion_its_number_of_times_and_averages_the_weights():
    torch.manual_seed(0)
    model, critic = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = {"model": 0, "critic": 0}

    def model_loss(batch):
        seen["model"] += 1
        return model(batch.float()).pow(2).mean()

    def critic_loss(batch):
        seen["critic"] += 1
        return critic(batch.float()).pow(2).mean()

    params = TrainParams(steps=4, lr=1e-2, grad_accum=2, warmup_steps=0, schedule="constant")
    blocks = torch.randn(8, 3)
    before = critic.weight.detach().clone()
    result = train(
        model, blocks, model_loss, params, seed=0, companion=Companion(critic, critic_loss, 1e-2, 3), ema_decay=0.5
    )
    assert seen == {"model": 4 * 2, "critic": 4 * 3 * 2} and len(result.companion_losses) == 4
    assert not torch.equal(critic.weight, before)
    # the average: with decay 0.5 over 4 steps the start keeps a weight of 1/16
    assert all(
        not torch.allclose(result.ema[name], p) and not torch.allclose(result.ema[name], start[name])
        for name, p in model.named_parameters()
    )


def test_guided_chunk_by_chunk_generation_runs_each_branch_over_its_own_cache():
    """Guided Euler sampling chunk by chunk over the cache equals, chunk by chunk, the masked forward of the clip so
    far without a cache (earlier chunks clean at level 0), once with the condition and once with zero tokens."""
    from streamify.runtime.video_sampling import shifted_sigmas, velocity

    model = pixel_wan()
    enable_causal_video(model, VideoSpec(2))
    condition = torch.randn(1, 3, 24)
    request = VideoRequest(frames=4, height=8, width=8, sample_steps=3, euler=True, guidance=3.0, seed=5)
    latents, result = generate_video(model, condition, request)
    assert result["evaluations_per_frame"] == 8  # (3 steps + the cache re-run) x 2 branches
    generator = torch.Generator().manual_seed(5)
    done = []
    with torch.no_grad():
        for chunk in range(2):
            x = torch.randn(1, 3, 2, 8, 8, generator=generator)
            for sigma, following in pairwise(shifted_sigmas(3)):
                levels = torch.tensor([[0.0] * 2 * chunk + [sigma] * 2])
                conditional, unconditional = (
                    velocity(model, torch.cat([*done, x], dim=2), c, levels)[:, :, -2:]
                    for c in (condition, torch.zeros_like(condition))
                )
                x = x + (following - sigma) * (unconditional + 3.0 * (conditional - unconditional))
            done.append(x)
    assert torch.allclose(latents, torch.cat(done, dim=2), atol=1e-4)
    unguided, _ = generate_video(model, condition, VideoRequest(4, 8, 8, sample_steps=3, euler=True, seed=5))
    assert (unguided - latents).abs().max() > 1e-2


def test_the_dmd_real_score_is_the_guided_teacher():
    """With the critic equal to the teacher, unguided DMD has nothing to correct; guided, its gradient is the
    difference between the plain and the guided clean predictions of the stock model."""
    from streamify.distill.dmd import dmd_loss

    teacher = pixel_wan()
    clip, condition = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 24)
    assert dmd_loss(clip, condition, teacher, teacher, 0.5, 0.5).item() == 0.0
    torch.manual_seed(3)
    loss = dmd_loss(clip, condition, teacher, teacher, 0.5, 0.5, guidance=4.0)
    torch.manual_seed(3)
    torch.rand(2)  # the levels dmd_loss draws (all 0.5 here)
    noisy = 0.5 * clip + 0.5 * torch.randn_like(clip)
    timestep = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        real = noisy - 0.5 * stock_guided_velocity(teacher, noisy, condition, timestep, 4.0)
        fake = noisy - 0.5 * teacher(hidden_states=noisy, timestep=timestep, encoder_hidden_states=condition)[0]
    gradient = (fake - real) / (clip - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert loss.item() > 0
    assert torch.allclose(loss, 0.5 * gradient.pow(2).mean(), rtol=1e-4)


def test_condition_dropout_trains_the_unconditional_model():
    """Dropout 1 is the loss with all-zero conditions (same draws); dropout 0 is the conditional loss."""
    from streamify.distill.flow_matching import flow_matching_loss

    model, clips, condition = pixel_wan(), torch.randn(3, 3, 2, 4, 4), torch.randn(3, 3, 24)
    losses = {}
    for name, cond, dropout in (("dropped", condition, 1.0), ("zeros", torch.zeros_like(condition), 0.0)):
        torch.manual_seed(0)
        if dropout == 0.0:
            torch.rand(3)  # the dropout draw the other call makes
        losses[name] = flow_matching_loss(model, clips, cond, dropout)
    torch.manual_seed(0)
    torch.rand(3)
    conditional = flow_matching_loss(model, clips, condition, 0.0)
    assert torch.equal(losses["dropped"], losses["zeros"])
    assert not torch.allclose(conditional, losses["zeros"])


def test_the_rolling_cache_keeps_memory_flat_over_ten_times_the_training_length():
    model = pixel_wan()
    enable_causal_video(model, VideoSpec(2, sink_frames=2, window_frames=4))
    condition = torch.randn(1, 3, 24)
    latents, result = generate_video(
        model, condition, VideoRequest(frames=60, height=8, width=8, timesteps=(1000, 500))
    )
    held = result["cache_bytes_per_chunk"]
    assert latents.shape == (1, 3, 60, 8, 8) and len(held) == 30
    per_frame = 2 * 2 * 16 * 2 * 12 * 4  # layers x (keys, values) x tokens x heads x head_dim x fp32
    assert held[:3] == [2 * per_frame, 4 * per_frame, 6 * per_frame]
    assert set(held[3:]) == {(2 + 4) * per_frame}
    assert result["evaluations_per_frame"] == 3  # two levels and the cache re-run


def test_a_generated_rollout_is_the_chunk_by_chunk_denoising_with_the_cache():
    """generate_video's chunks equal a rollout of the same noise, and the first chunk a direct few-step denoise."""
    model = pixel_wan()
    enable_causal_video(model, VideoSpec(1))
    condition = torch.randn(1, 3, 24)
    request = VideoRequest(frames=3, height=4, width=4, timesteps=(1000,), seed=5)
    latents, _ = generate_video(model, condition, request)
    generator = torch.Generator().manual_seed(5)
    noise = torch.cat([torch.randn(1, 3, 1, 4, 4, generator=generator) for _ in range(3)], dim=2)
    with torch.no_grad():
        assert torch.allclose(rollout(model, noise, condition, [1.0]), latents, atol=1e-5)
        v = model(hidden_states=noise[:, :, :1], timestep=torch.tensor([1000.0]), encoder_hidden_states=condition)[0]
    assert torch.allclose(latents[:, :, :1], noise[:, :, :1] - v, atol=1e-5)


def _read_mp4(path) -> tuple[dict, list[np.ndarray]]:
    """An MP4's metadata and its frames ``[H, W, 3]`` as ffmpeg decodes them (an independent reader)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]


@pytest.mark.parametrize(("size", "fps"), [(16, 8), (32, 16)])
def test_mp4_frames_decode_close_to_what_was_written(tmp_path, size, fps):
    """H.264 at CRF 12: every decoded frame of a builtin:shapes clip is within a few levels of its own frame on
    average, closer than to the next one (the order holds), at the frame rate asked for; an odd side is padded
    to an even one."""
    from streamify.data.shapes import make_clip
    from streamify.runtime.video_generate import write_frames

    clip = make_clip(3, frames=10, size=size)
    pixels = (clip.frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    (tmp_path / "clip").mkdir()
    assert write_frames([clip.frames[:4], clip.frames[4:]], tmp_path / "clip", fps) == 10  # in two groups
    meta, frames = _read_mp4(tmp_path / "clip" / "video.mp4")
    assert meta["fps"] == fps and meta["size"] == (size, size) and len(frames) == 10

    def error(a, b) -> float:
        return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())

    for index, frame in enumerate(frames):
        assert error(frame, pixels[index]) < 3.0
        assert error(frame, pixels[index]) < error(frame, pixels[(index + 1) % 10])
    (tmp_path / "odd").mkdir()
    write_frames([clip.frames[:3, :, :7, :9]], tmp_path / "odd", fps)
    meta, frames = _read_mp4(tmp_path / "odd" / "video.mp4")
    assert meta["size"] == (10, 8) and len(frames) == 3


def test_generate_writes_latents_pngs_and_a_gif_of_a_video_student(wans, tmp_path, cli):
    out = tmp_path / "clip"
    result = cli(
        "generate", wans / "student", "--prompt", "red square moving up", "-o", out, "--frames", "6",
        "--height", "8", "--width", "8", "--fps", "16", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "block-causal, chunk by chunk" and report["frames"] == 6 and report["frames_per_s"] > 0
    assert load_file(out / "latents.safetensors")["latents"].shape == (1, 3, 6, 8, 8)
    assert len(list((out / "frames").glob("*.png"))) == 6
    with Image.open(out / "video.gif") as gif:
        assert gif.n_frames == 6 and gif.size == (8, 8) and abs(gif.info["duration"] - 1000 / 16) < 5  # centiseconds
    meta, frames = _read_mp4(out / "video.mp4")
    assert len(frames) == 6 and meta["size"] == (8, 8) and meta["fps"] == 16 and meta["codec"] == "h264"
    again = cli("generate", wans / "student", "--prompt", "red square moving up", "-o", out)
    assert again.exit_code == 2 and "not an empty folder" in again.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--prompt", "purple square moving up"], 2, "is not a builtin:shapes label"),
        (["--prompt", "red square moving up", "--frames", "5"], 2, "whole chunks of 2 latent frames"),
        (["--prompt", "red square moving up", "--timesteps", "500,1000"], 2, "not decreasing numbers"),
        (["--prompt", "red square moving up", "--timesteps", "1000,nan"], 2, "not decreasing numbers"),
        (["--prompt", "red square moving up", "--height", "7"], 2, "not whole patches of 1 x 2 x 2"),
        ([], 2, "needs a condition"),
    ],
)
def test_video_generation_refuses_bad_requests(wans, tmp_path, cli, args, code, message):
    result = cli("generate", wans / "student", "-o", tmp_path / "out", *args)
    assert result.exit_code == code and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def wan_vae(tmp_path_factory):
    """A tiny random diffusers AutoencoderKLWan for 4-channel latents (frames x2 after the first, sides x2), in a
    Wan pipeline folder's ``vae/``, with latent statistics that are not the identity."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipeline")
    AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.5, -0.25, 0.1, 0.0], latents_std=[2.0, 0.5, 1.5, 1.0],
    ).save_pretrained(root / "vae")  # fmt: skip
    return root


def test_generate_decodes_a_latent_model_through_its_vae_as_the_wan_pipeline_does(wans, wan_vae, tmp_path, cli):
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    out = tmp_path / "clip"
    condition = tmp_path / "c.safetensors"
    save_file({"condition": torch.randn(3, 24)}, str(condition))
    args = ["--condition", condition, "-o", out, "--frames", "3", "--height", "4", "--width", "4"]
    result = cli("generate", wans / "latent", *args, "--vae", wan_vae)
    assert result.exit_code == 0, result.stderr
    latents = load_file(out / "latents.safetensors")["latents"]
    vae = AutoencoderKLWan.from_pretrained(wan_vae / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():  # diffusers' WanPipeline: latents / (1 / std) + mean, decode, postprocess
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    expected = VideoProcessor(vae_scale_factor=2).postprocess_video(video, output_type="pil")[0]
    written = [Image.open(f) for f in sorted((out / "frames").glob("*.png"))]
    assert len(written) == len(expected) == 5 and written[0].size == (8, 8)
    for mine, theirs in zip(written, expected, strict=True):
        difference = torch.tensor(list(mine.getdata())) - torch.tensor(list(theirs.getdata()))
        assert difference.abs().max() <= 1  # the same frames, up to rounding at .5
    with Image.open(out / "video.gif") as gif:
        assert gif.n_frames == 5
    # decoded a latent frame at a time through the VAE's causal cache: exactly the pipeline's decode of the clip
    from streamify.runtime.video_generate import decode_frames

    groups = list(decode_frames(vae, latents))
    assert [len(group) for group in groups] == [1, 2, 2]  # the first latent frame, then 2 frames each
    assert torch.equal(torch.cat(groups), ((video[0].permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1))


def test_a_vae_that_fails_to_decode_keeps_the_generated_latents(wans, wan_vae, tmp_path, cli, monkeypatch):
    """A VAE that runs out of memory after a long generation: exit 4, no output folder, and the latents saved
    beside it (the generation is not lost)."""
    import streamify.runtime.video_generate as video_generate

    def out_of_memory(vae, latents):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(video_generate, "decode_frames", out_of_memory)
    condition = tmp_path / "c.safetensors"
    save_file({"condition": torch.randn(3, 24)}, str(condition))
    out = tmp_path / "new" / "clip"  # in a folder that does not exist yet
    args = ["--condition", condition, "-o", out, "--frames", "3", "--height", "4", "--width", "4", "--vae", wan_vae]
    result = cli("generate", wans / "latent", *args)
    kept = tmp_path / "new" / "clip.latents.safetensors"
    assert result.exit_code == 4 and "out of memory" in result.stderr and str(kept) in result.stderr
    assert not out.exists() and load_file(kept)["latents"].shape == (1, 4, 3, 4, 4)


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        (
            "student",
            ["--frames", "130"],
            "cover 128 latent frames (rope_max_seq_len 128, temporal patch 1), and the cache",
        ),
        ("teacher", ["--frames", "130"], "temporal patch 1), and the whole clip is one attention"),
        ("teacher", ["--frames", "2", "--height", "258"], "--height 258: the model's rotary positions cover 128"),
    ],
)
def test_generation_past_the_rotary_table_is_refused_and_a_rolling_cache_goes_on(
    wans, tmp_path, cli, model, args, message
):
    """Positions past rope_max_seq_len once failed inside diffusers as an internal error (exit 1); a student
    with a rolling window re-numbers its cache and generates past the table."""
    result = cli("generate", wans / model, "--prompt", "red square moving up", "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    if model == "student" and args[1] == "130":
        rolling = tmp_path / "rolling"
        convert = ("convert", "causal-video", wans / "teacher", "-o", rolling, "--chunk-frames", "2")
        assert cli(*convert, "--sink-frames", "1", "--window-frames", "2").exit_code == 0
        result = cli("generate", rolling, "--prompt", "red square moving up", "-o", tmp_path / "out", *args,
                     "--height", "4", "--width", "4", "--format", "json")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert load_file(tmp_path / "out" / "latents.safetensors")["latents"].shape[2] == 130


@pytest.mark.parametrize(
    ("model", "vae", "code", "message"),
    [
        ("student", "pipeline", 2, "works in RGB pixels"),
        ("latent", "teacher", 3, "a WanTransformer3DModel, not one of"),
        ("latent", "nothing", 3, "no config.json there"),
    ],
)
def test_a_vae_that_cannot_decode_the_model_is_refused(wans, wan_vae, tmp_path, cli, model, vae, code, message):
    folder = {"pipeline": wan_vae, "teacher": wans / "teacher", "nothing": tmp_path}[vae]
    condition = tmp_path / "c.safetensors"
    save_file({"condition": torch.randn(3, 24)}, str(condition))
    args = ["--prompt", "red square moving up"] if model == "student" else ["--condition", condition]
    result = cli("generate", wans / model, *args, "-o", tmp_path / "out", "--frames", "2", "--vae", folder)
    assert result.exit_code == code and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_condition_file_of_another_width_is_refused(wans, tmp_path, cli):
    save_file({"condition": torch.randn(5, 7)}, str(tmp_path / "c.safetensors"))
    result = cli("generate", wans / "student", "-o", tmp_path / "out", "--condition", tmp_path / "c.safetensors")
    assert result.exit_code == 3 and "c.safetensors" in result.stderr and "[tokens, 24]" in result.stderr


@pytest.mark.parametrize(
    ("stage", "model", "args", "code", "message"),
    [
        ("ode-init", "teacher", [], 2, "and the model is bidirectional"),
        ("ode-init", "student", ["--frames", "3"], 2, "not whole chunks of 2 frames"),
        ("self-forcing", "student", ["--frames", "130"], 2, "cover 128 latent frames (rope_max_seq_len 128"),
        ("self-forcing", "student", ["--teacher", "latent"], 3, "teacher and student differ in in_channels 4 vs 3"),
        ("self-forcing", "student", ["--teacher", "student"], 3, "the teacher is block-causal"),
        ("self-forcing", "student", ["--teacher", "/no/teacher"], 3, "distill.self_forcing: the teacher /no/teacher"),
        ("self-forcing", "student", ["--timesteps", "1000,1000"], 2, "timesteps start at 1000 and decrease"),
        ("ode-init", "bert", [], 3, "applies to denoiser models"),
    ],
)
def test_video_distillation_refuses_bad_input(wans, tiny_kinds, tmp_path, cli, stage, model, args, code, message):
    path = tiny_kinds["encoder"] if model == "bert" else wans / model
    args = [str(wans / a) if a in ("latent", "student") else a for a in args]
    result = cli("distill", stage, path, "-o", tmp_path / "out", "--data", SHAPES, "--steps", "1", "--no-eval", *args)
    assert result.exit_code == code and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("dtype", "bad", "message"),
    [
        (torch.float32, float("nan"), "'conditions' holds 1 NaN or infinite values (the first at index [3, 1, 5])"),
        (torch.float16, float("inf"), "'conditions' holds 1 NaN or infinite values (the first at index [3, 1, 5])"),
        (torch.int32, 0, "'conditions' holds int32 values, not floats"),
    ],
)
def test_a_conditions_file_with_nan_or_integer_states_is_refused_before_training(
    wans, tmp_path, cli, dtype, bad, message
):
    """NaN states once trained to NaN weights that were published with exit 0."""
    table = torch.randn(10, 3, 24)
    table[3, 1, 5] = bad
    save_file({"conditions": table.to(dtype)}, str(tmp_path / "prompts.safetensors"))
    args = ["--data", tmp_path / "prompts.safetensors", "--steps", "2", "--no-eval", "--no-cache"]
    result = cli("distill", "ode-init", wans / "student", "-o", tmp_path / "out", *args)
    assert result.exit_code == 3 and f"prompts.safetensors: {message}" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_ode_init_and_self_forcing_read_conditions_from_a_file(wans, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    table = torch.randn(10, 3, 24)
    save_file({"conditions": table}, str(tmp_path / "prompts.safetensors"))
    from streamify.distill.video_setup import conditions

    config = {"text_dim": 24}
    assert torch.equal(conditions(str(tmp_path / "prompts.safetensors"), config, "train", 11, 3)[:9], table[:9])
    assert torch.equal(conditions(str(tmp_path / "prompts.safetensors"), config, "heldout", 2, 3)[0], table[9])
    logged = []
    progress = type("Log", (), {"log": lambda self, line: logged.append(line)})()
    conditions(str(tmp_path / "prompts.safetensors"), config, "train", 11, 3, progress)
    assert logged == [
        f"{tmp_path / 'prompts.safetensors'}: 9 train prompts for 11 samples: each is used more than once"
    ]


@pytest.fixture(scope="module")
def wan_text_parts(tmp_path_factory):
    """The tokenizer/ and text_encoder/ of a Wan Diffusers checkpoint: a word-level tokenizer and a tiny random
    UMT5 encoder whose states are as wide as the test denoisers' text_dim (24)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan-text")
    words = [
        "<pad>",
        "</s>",
        "<unk>",
        *["a", "red", "blue", "square", "circle", "moving", "up", "down", "left", "right", "fast"],
    ]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(words), d_model=24, d_kv=6, d_ff=32, num_layers=2, num_heads=4)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root


def test_encode_prompts_writes_the_encoders_states_past_each_prompt_zeroed(wans, wan_text_parts, tmp_path, cli):
    from transformers import AutoTokenizer, UMT5EncoderModel

    prompts = ["a red square moving up", "blue circle moving down right"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "conditions.safetensors"
    args = ["--text-encoder", wan_text_parts, "--max-length", "12", "--format", "json"]
    result = cli("encode-prompts", tmp_path / "prompts.txt", "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shape"] == [2, 12, 24]
    written = load_file(out)
    tokenizer = AutoTokenizer.from_pretrained(wan_text_parts / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(wan_text_parts / "text_encoder").eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    expected = states * tokens.attention_mask[..., None]
    assert set(written) == {"conditions", "unconditional"}
    assert torch.allclose(written["conditions"], expected, atol=1e-6)
    assert written["conditions"][0, 5:].abs().max() == 0 and written["conditions"][0, :5].abs().min() > 0
    (tmp_path / "one.txt").write_text("a blue square moving left\n")
    single = tmp_path / "one.safetensors"
    assert cli("encode-prompts", tmp_path / "one.txt", "-o", single, *args, "--negative", "red circle").exit_code == 0
    one = load_file(single)
    assert torch.equal(one["condition"], one["conditions"][0])  # what generate --condition reads
    for text, file in (("", written), ("red circle", one)):  # WanPipeline's negative_prompt: "" by default
        tokens = tokenizer([text], padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        with torch.no_grad():
            states = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
        assert torch.allclose(file["unconditional"], (states * tokens.attention_mask[..., None])[0], atol=1e-6)
    clip = tmp_path / "clip"
    args = ["--condition", single, "-o", clip, "--frames", "2", "--height", "4", "--guidance", "2", "--format", "json"]
    made = cli("generate", wans / "latent", *args)
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["unconditional"] == "the file's negative prompt"


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [("no encoder", 3, "no text_encoder/ folder there"), ("empty", 3, "no prompts in it"), ("exists", 2, "exists")],
)
def test_encode_prompts_refuses_bad_input(wan_text_parts, tmp_path, cli, case, code, message):
    prompts, out, folder = tmp_path / "prompts.txt", tmp_path / "c.safetensors", wan_text_parts
    prompts.write_text("" if case == "empty" else "a red square\n")
    if case == "no encoder":
        folder = tmp_path / "partial"
        shutil.copytree(wan_text_parts / "tokenizer", folder / "tokenizer")
    if case == "exists":
        out.write_bytes(b"keep me")
    result = cli("encode-prompts", prompts, "-o", out, "--text-encoder", folder)
    assert result.exit_code == code and message in result.stderr, result.stderr
    assert (out.read_bytes() == b"keep me") if case == "exists" else not out.exists()


def test_a_conditions_files_negative_prompt_is_the_unconditional_branch_of_both_stages(
    wans, tmp_path, cli, monkeypatch
):
    """With guidance, distill ode-init samples and distill self-forcing scores with the file's 'unconditional'
    states in place of zero tokens (seen inside the teacher's sampling and the DMD loss); a file whose
    'unconditional' has another shape than its conditions is refused."""
    import streamify.distill.ode_init as ode_init
    import streamify.distill.self_forcing as self_forcing
    from streamify.runtime.video_sampling import NEGATIVE

    monkeypatch.setenv("STREAMIFY_CACHE_DIR", str(tmp_path / "cache"))
    negative = torch.randn(3, 24)
    data = tmp_path / "prompts.safetensors"
    save_file({"conditions": torch.randn(10, 3, 24), "unconditional": negative}, str(data))
    seen = []

    def watching(inner, model_argument):
        def call(*args, **kwargs):
            seen.append(getattr(args[model_argument], NEGATIVE, None))
            return inner(*args, **kwargs)

        return call

    monkeypatch.setattr(ode_init, "sample_clip", watching(ode_init.sample_clip, 0))
    monkeypatch.setattr(self_forcing, "dmd_loss", watching(self_forcing.dmd_loss, 2))
    clip = ["--frames", "2", "--height", "4", "--width", "4", "--samples", "2", "--heldout-samples", "1"]
    common = ["--data", data, "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--guidance", "3", *clip]
    ode = cli("distill", "ode-init", wans / "student", "-o", tmp_path / "ode", *common, "--teacher-steps", "2",
              "--keep", "0", "--teacher", wans / "teacher", "--no-eval")  # fmt: skip
    assert ode.exit_code == 0, ode.stderr
    sf = cli("distill", "self-forcing", tmp_path / "ode", "-o", tmp_path / "sf", *common, "--teacher",
             wans / "teacher", "--critic-updates", "1", "--no-eval")  # fmt: skip
    assert sf.exit_code == 0, sf.stderr
    assert len(seen) >= 4 and all(s is not None and torch.equal(s, negative) for s in seen)
    save_file({"conditions": torch.randn(10, 3, 24), "unconditional": torch.randn(4, 24)}, str(data))
    bad = cli("distill", "ode-init", wans / "student", "-o", tmp_path / "bad", *common, "--teacher-steps", "2",
              "--keep", "0", "--teacher", wans / "teacher", "--no-eval")  # fmt: skip
    assert bad.exit_code == 3 and "'unconditional' is [4, 24]" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_frames_that_cannot_be_written_keep_the_generated_latents(wans, tmp_path, cli, monkeypatch):
    """ffmpeg failing after the generation (here on an encoder setting it rejects; a full disk fails the same
    way): exit 4 with ffmpeg's message, no output folder, the latents kept beside it. Before, ffmpeg's exit
    status was not read and the folder was published without its video.mp4."""
    import streamify.runtime.video_generate as video_generate

    monkeypatch.setattr(video_generate, "MP4_CRF", "not-a-number")
    out = tmp_path / "clip"
    result = cli("generate", wans / "student", "--prompt", "red square moving up", "-o", out, "--frames", "2",
                 "--height", "8", "--width", "8")  # fmt: skip
    kept = tmp_path / "clip.latents.safetensors"
    assert result.exit_code == 4, result.stderr
    assert "the frames could not be decoded or written (ffmpeg could not write video.mp4: " in result.stderr
    assert not out.exists() and load_file(kept)["latents"].shape == (1, 3, 2, 8, 8)
    assert not list(tmp_path.glob(".clip*"))  # no temporary folder left


@pytest.mark.parametrize("during", ["write", "close"])
def test_ctrl_c_while_the_frames_are_written_keeps_the_latents(wans, tmp_path, cli, monkeypatch, during):
    """Ctrl-C after the generation, while frames are written or the MP4 is finished: exit 130, ffmpeg stopped
    (it would wait for more frames), no output folder, the latents kept (a second run's beside the first's)."""
    import streamify.runtime.video_generate as video_generate

    started = []

    class Interrupting(video_generate.Mp4Writer):
        def __init__(self, *args):
            super().__init__(*args)
            started.append(self._process)

        def write(self, frame):
            if during == "write":
                raise KeyboardInterrupt
            super().write(frame)

        def close(self):
            raise KeyboardInterrupt  # before ffmpeg's input is closed

    monkeypatch.setattr(video_generate, "Mp4Writer", Interrupting)
    out = tmp_path / "clip"
    for kept in ("clip.latents.safetensors", "clip.latents-2.safetensors"):
        result = cli("generate", wans / "student", "--prompt", "red square moving up", "-o", out, "--frames", "2",
                     "--height", "8", "--width", "8")  # fmt: skip
        assert result.exit_code == 130 and "interrupted before the frames were written" in result.stderr
        assert kept in result.stderr and load_file(tmp_path / kept)["latents"].shape == (1, 3, 2, 8, 8)
    assert not out.exists() and not list(tmp_path.glob(".clip*"))
    assert len(started) == 2 and all(process.poll() is not None for process in started)  # no ffmpeg left running
