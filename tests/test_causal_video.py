"""convert.causal_video: block-causal Wan denoisers, chunk-by-chunk with a KV cache, against the stock model."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

import streamify
from streamify.errors import UsageError
from streamify.eval.video import check_video_equivalence, stock_masked
from streamify.runtime.causal_video import VideoCache, VideoSpec, caching, disable_causal_video, enable_causal_video


def tiny_wan(channels: int = 4, seed: int = 0, patch: tuple[int, int, int] = (1, 2, 2)) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=64,
    ).eval()  # fmt: skip


def denoise(model, latents, condition, t=400.0):
    return model(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=condition)[0]


@pytest.mark.parametrize(
    ("chunk", "patch", "batch"), [(1, (1, 2, 2), 1), (2, (1, 2, 2), 1), (3, (1, 2, 2), 2), (2, (2, 2, 2), 2)]
)
def test_chunked_cached_denoising_equals_the_masked_whole_clip_and_the_stock_model(chunk, patch, batch):
    """Also with two latent frames to a patch, a batch of two and frames of 6 x 10 patches (not square)."""
    model = tiny_wan(patch=patch)
    generator = torch.Generator().manual_seed(1)
    step = chunk * patch[0]
    latents = torch.randn(batch, 4, 4 * step, 12, 20, generator=generator)
    condition = torch.randn(batch, 5, 24, generator=generator)
    with torch.no_grad():
        bidirectional = denoise(model, latents, condition)
        enable_causal_video(model, VideoSpec(chunk))
        whole = denoise(model, latents, condition)
        reference = stock_masked(model, latents, condition, 400.0)
        with caching(model, VideoCache(), write=True):
            pieces = [denoise(model, latents[:, :, s : s + step], condition) for s in range(0, 4 * step, step)]
    chunked = torch.cat(pieces, dim=2)
    assert torch.allclose(whole, reference, atol=1e-5) and torch.allclose(chunked, reference, atol=1e-5)
    assert (whole[:, :, :step] - bidirectional[:, :, :step]).abs().max() > 1e-3  # the first no longer sees ahead
    disable_causal_video(model)
    with torch.no_grad():
        assert torch.equal(denoise(model, latents, condition), bidirectional)


def test_a_denoising_step_without_write_leaves_the_cache_as_it_was():
    model = tiny_wan()
    enable_causal_video(model, VideoSpec(2))
    latents, condition = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 24)
    cache = VideoCache()
    with torch.no_grad():
        with caching(model, cache, write=True):
            denoise(model, latents, condition, t=0.0)
        held = {k: (a.clone(), b.clone()) for k, (a, b) in cache.layers.items()}
        with caching(model, cache, write=False):
            first = denoise(model, latents, condition, t=750.0)
            again = denoise(model, latents, condition, t=750.0)
    assert torch.equal(first, again)
    assert all(torch.equal(cache.layers[k][0], a) and torch.equal(cache.layers[k][1], b) for k, (a, b) in held.items())


def test_the_rolling_cache_with_sinks_keeps_memory_constant_over_ten_times_the_training_length():
    """Training clips of 4 chunks; a rollout of 40 chunks holds sinks + window frames once the window is full,
    and until the cache first drops a frame it is the unbounded run."""
    model = tiny_wan()
    enable_causal_video(model, VideoSpec(2, sink_frames=1, window_frames=4))
    generator = torch.Generator().manual_seed(2)
    chunks = [torch.randn(1, 4, 2, 8, 8, generator=generator) for _ in range(40)]
    condition = torch.randn(1, 5, 24, generator=generator)
    sizes, rolling = [], []
    with torch.no_grad(), caching(model, VideoCache(), write=True) as cache:
        for chunk in chunks:
            rolling.append(denoise(model, chunk, condition))
            sizes.append(cache.nbytes())
    per_frame = sizes[0] // 2
    assert sizes == [2 * per_frame, 4 * per_frame] + [5 * per_frame] * 38  # 1 sink + 4 window frames from chunk 3
    assert all(torch.isfinite(out).all() for out in rolling)
    enable_causal_video(model, VideoSpec(2))
    with torch.no_grad(), caching(model, VideoCache(), write=True):
        unbounded = [denoise(model, chunk, condition) for chunk in chunks[:4]]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(rolling[:3], unbounded[:3], strict=True))
    assert not torch.allclose(rolling[3], unbounded[3], atol=1e-4)  # the first frame dropped: another context


def test_the_rolling_cache_keeps_the_sinks_and_the_latest_frames():
    """Frames labelled by their index go through the cache: it keeps frame 0 (the sink) and the latest four, and
    the whole-clip mask lets a chunk see exactly those."""
    model = tiny_wan()
    ctl = enable_causal_video(model, VideoSpec(2, sink_frames=1, window_frames=4))
    processor = model.blocks[0].attn1.processor
    per_frame = 3
    frames = torch.arange(14).repeat_interleave(per_frame).float()[None, :, None, None]
    kept, _ = processor._kept(frames, frames, per_frame)
    assert kept[0, ::per_frame, 0, 0].tolist() == [0, 10, 11, 12, 13]
    allowed = ctl.spec.allowed(torch.arange(14), torch.arange(14))
    assert torch.nonzero(allowed[12]).flatten().tolist() == [0, 8, 9, 10, 11, 12, 13]
    assert torch.nonzero(allowed[3]).flatten().tolist() == [0, 1, 2, 3]


def test_a_call_over_the_cache_takes_one_chunk_and_a_deep_copy_has_its_own_runtime():
    import copy

    model = tiny_wan()
    enable_causal_video(model, VideoSpec(2))
    condition = torch.randn(1, 5, 24)
    refused = pytest.raises(UsageError, match="one chunk of 2 latent frames")
    with torch.no_grad(), caching(model, VideoCache(), write=True), refused:
        denoise(model, torch.randn(1, 4, 3, 8, 8), condition)
    twin = copy.deepcopy(model)
    latents = torch.randn(1, 4, 4, 12, 8)
    with torch.no_grad():
        assert torch.equal(denoise(twin, latents, condition), denoise(model, latents, condition))


def test_the_check_fails_when_the_runtime_is_wrong(monkeypatch):
    import streamify.runtime.causal_video as causal_video

    model = tiny_wan()
    enable_causal_video(model, VideoSpec(2))
    assert check_video_equivalence(model)["max_rel_diff"] < 1e-5
    original = causal_video.VideoController.rope_for
    monkeypatch.setattr(
        causal_video.VideoController,
        "rope_for",
        lambda self, frames, like: tuple(t.roll(1, dims=1) for t in original(self, frames, like)),
    )
    assert check_video_equivalence(model)["chunked_max_abs_diff"] > 1e-3


def test_convert_causal_video_writes_an_artifact_that_loads_block_causal(tiny_kinds, tmp_path, cli):
    out = tmp_path / "causal"
    result = cli(
        "convert", "causal-video", tiny_kinds["denoiser"], "-o", out, "--chunk-frames", "1", "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["chunk_frames"] == 1 and metrics["equivalence"]["max_rel_diff"] < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["streamify_causal_video"] == {"chunk_frames": 1, "sink_frames": 0, "window_frames": None}
    model, _ = streamify.load(str(out))
    assert model.streamify_video.spec == VideoSpec(1)
    check = cli("eval", out, "--check", "equivalence", "--format", "json")
    assert check.exit_code == 0 and json.loads(check.stdout)["equivalence"]["max_rel_diff"] < 1e-5


@pytest.mark.parametrize(
    ("which", "args", "code", "message"),
    [
        ("llama", [], 3, "applies to denoiser models"),
        ("denoiser", ["--chunk-frames", "0"], 2, "--chunk-frames"),
        ("denoiser", ["--window-frames", "0"], 2, "--window-frames"),
    ],
)
def test_bad_input_is_refused_clearly(tiny_kinds, tiny_models, tmp_path, cli, which, args, code, message):
    model = tiny_models["llama"] if which == "llama" else tiny_kinds["denoiser"]
    result = cli("convert", "causal-video", model, "-o", tmp_path / "out", *args)
    assert result.exit_code == code, result.stderr
    assert message in " ".join(result.stderr.split()) and not (tmp_path / "out").exists()
