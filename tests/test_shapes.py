"""builtin:shapes: synthetic bouncing-shape clips whose dynamics are known, and the measures built on them."""

from __future__ import annotations

import json

import pytest
import torch

from streamify.data.shapes import (
    COLOURS,
    DIRECTIONS,
    HELDOUT_SEED,
    SHAPES,
    bounce_path,
    clip_features,
    clip_latents,
    colour_error,
    detect,
    draw_clip,
    frechet_distance,
    label_condition,
    latents_frames,
    make_clip,
    radius,
    shapes_clips,
    start_positions,
    trajectory_error,
)
from streamify.errors import UsageError

OPPOSITE = {"up": "down", "left": "right", "up-left": "down-right", "up-right": "down-left"}
OPPOSITE.update({b: a for a, b in OPPOSITE.items()})


@pytest.mark.parametrize("size", [16, 32])
def test_the_detector_finds_every_shape_exactly_and_the_clip_obeys_the_rule(size):
    for seed in range(60):
        clip = make_clip(seed, frames=40, size=size)  # 40 frames: every clip bounces at least once
        centre, colour = detect(clip.frames)
        assert torch.allclose(centre, clip.centres, atol=1e-4), (seed, clip.label)
        assert torch.allclose(colour, torch.tensor(COLOURS[clip.colour]).expand(40, 3), atol=1e-5)
        assert trajectory_error(clip.frames, clip.direction) < 1e-4
        assert colour_error(clip.frames, clip.colour) < 1e-5
        inside = (clip.centres >= radius(size) - 0.5) & (clip.centres <= size - radius(size) - 0.5)
        assert inside.all(), (seed, clip.label)


@pytest.mark.parametrize("size", [16, 32])
def test_every_clip_is_drawn_from_its_label_and_one_of_the_start_positions(size):
    """The data is the finite set the benchmark's best-possible denoiser enumerates: each seed's clip is
    draw_clip of its own label and a start from start_positions, and 400 seeds reach every start position."""
    seen = set()
    for seed in range(400):
        clip = make_clip(seed, frames=6, size=size)
        start = tuple(clip.centres[0].tolist())
        assert set(start) <= set(start_positions(size)), (seed, start)
        again = draw_clip(clip.shape, clip.colour, clip.direction, start, 6, size)
        assert torch.equal(again.frames, clip.frames) and torch.equal(again.centres, clip.centres)
        seen.update(start)
    assert seen == set(start_positions(size))


def test_a_bounce_reflects_off_each_wall_and_out_of_a_corner():
    path = bounce_path(torch.tensor([3.5, 8.0]), "left", 6, 16)
    assert path[:, 0].tolist() == [3.5, 2.5, 1.5, 2.5, 3.5, 4.5] and (path[:, 1] == 8.0).all()
    path = bounce_path(torch.tensor([11.5, 8.0]), "right", 5, 16)  # the far wall: 16 - 2 - 0.5
    assert path[:, 0].tolist() == [11.5, 12.5, 13.5, 12.5, 11.5]
    path = bounce_path(torch.tensor([12.5, 12.5]), "down-right", 4, 16)
    assert path.tolist() == [[12.5, 12.5], [13.5, 13.5], [12.5, 12.5], [11.5, 11.5]]


def test_the_measures_tell_wrong_motion_colour_and_noise_apart():
    clip = make_clip(5, frames=16)
    assert trajectory_error(clip.frames, OPPOSITE[clip.direction]) > 3
    other = next(c for c in COLOURS if c != clip.colour)
    assert colour_error(clip.frames, other) > 0.3
    noise = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert trajectory_error(noise, clip.direction) > 1.5
    blank = torch.zeros(16, 3, 16, 16)
    assert trajectory_error(blank, clip.direction) == 16.0 and colour_error(blank, clip.colour) == pytest.approx(3**0.5)


def test_splits_are_deterministic_disjoint_and_cover_the_labels():
    train, heldout = shapes_clips("train", 200), shapes_clips("heldout", 3)
    assert torch.equal(train[7].frames, make_clip(7).frames) and torch.equal(
        heldout[0].frames, make_clip(HELDOUT_SEED).frames
    )
    assert not torch.equal(train[0].frames, heldout[0].frames)
    assert {c.direction for c in train} == set(DIRECTIONS) and {c.colour for c in train} == set(COLOURS)
    with pytest.raises(UsageError):
        shapes_clips("test", 1)
    with pytest.raises(UsageError):
        make_clip(0, size=24)


def test_frechet_distance_is_small_between_splits_and_large_against_noise():
    real = torch.stack([clip_features(c.frames) for c in shapes_clips("train", 64)])
    same = torch.stack([clip_features(c.frames) for c in shapes_clips("heldout", 64)])
    generator = torch.Generator().manual_seed(0)
    noise = torch.stack([clip_features(torch.rand(16, 3, 16, 16, generator=generator) * 0.5) for _ in range(64)])
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(real, same) < 0.1 < 1.0 < frechet_distance(real, noise)


def test_latents_and_conditions():
    clip = make_clip(2, frames=8)
    latents = clip_latents(clip)
    assert latents.shape == (1, 3, 8, 16, 16) and latents.min() == -1 and latents.max() <= 1
    assert torch.allclose(latents_frames(latents), clip.frames, atol=1e-6)
    condition = label_condition(clip, tokens=4, dim=20)
    assert condition.shape == (4, 20) and condition.sum() == 3 and condition[3].sum() == 0
    hot = condition.argmax(dim=1)[:3].tolist()
    assert hot == [
        list(COLOURS).index(clip.colour),
        len(COLOURS) + list(SHAPES).index(clip.shape),
        len(COLOURS) + len(SHAPES) + list(DIRECTIONS).index(clip.direction),
    ]
    with pytest.raises(UsageError, match="text_dim of at least 17"):
        label_condition(clip, tokens=4, dim=8)


def test_a_pixel_denoiser_is_evaluated_on_heldout_clips_and_a_latent_one_is_refused(tmp_path, tiny_kinds, cli):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    folder = tmp_path / "wan-rgb"
    WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
        text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).save_pretrained(folder)  # fmt: skip
    result = cli("eval", folder, "--data", "builtin:shapes", "--max-items", "4", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["model"]
    assert report["samples"] == 4 and report["denoising_loss"] > 0 and report["data"] == "builtin:shapes"
    refused = cli("eval", tiny_kinds["denoiser"], "--data", "builtin:shapes")
    assert refused.exit_code == 2 and "RGB pixels" in refused.stderr
