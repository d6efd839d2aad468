"""Self-forcing on ``builtin:shapes``: teacher, diffusion-forced student and self-forcing student, side by side.

There is no pretrained video model on this machine, so the benchmark trains its
own teacher: a small Wan-architecture transformer (``WanTransformer3DModel``,
pixels in, patch 1 x 4 x 4, 4 blocks of width 64) learns ``builtin:shapes`` clips of 8 frames at
16 x 16 with flow matching. From it come two block-causal students with the
same chunking (2 frames a chunk) and the same rolling cache (2 sink frames +
a window of 4):

- diffusion-forced: the teacher's weights under the block-causal mask, trained
  on the same clips with a noise level per chunk, sampled chunk by chunk with
  Euler steps (the teacher-forced / diffusion-forced baseline);
- self-forcing: ``distill.ode_init`` on the teacher's trajectories, then
  ``distill.self_forcing`` (4 steps a chunk), sampled with those 4 steps.

Each model generates held-out labels' clips of 1x, 4x and 16x the training
length, every (model, length) in a fresh process for its peak memory. Per
length: trajectory error (pixels, against the bounce rule from the first
detected centre), colour error, Fréchet distance of clip statistics to real
clips of that length, denoiser evaluations per frame, frames per second, the
cache's bytes at the end and the process's peak RSS while generating (VmHWM, reset after
loading and a warm-up).

Run: ``.venv/bin/python benchmarks/self_forcing.py`` (about 40 minutes on 2 cores);
``--quick`` for a smoke run of a few minutes (numbers meaningless); ``--oracle`` for the loss of the best
possible denoiser on held-out clips, exact and without a teacher (under a minute).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HORIZONS = (1, 4, 16)
TRAIN_FRAMES, SIZE, TOKENS, TEXT_DIM = 8, 16, 4, 24
CHUNK, SINKS, WINDOW = 2, 2, 4
TEACHER_STEPS = 48
CONDITION_DROPOUT = 0.1  # trains the unconditional model too, for classifier-free guidance
GUIDANCE = 3.0  # the teacher's sampling, the ODE trajectories and DMD's real score (Self-Forcing: 3)
STUDENT_TIMESTEPS = (1000, 750, 500, 250)
ORACLE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)
FULL = {"clips": 4000, "teacher": 8000, "forced": 1000, "ode_samples": 256, "ode": 600, "sf": 150, "eval": 16}
QUICK = {"clips": 64, "teacher": 10, "forced": 5, "ode_samples": 8, "ode": 5, "sf": 2, "eval": 2}


def wan_config() -> dict:
    return dict(
        patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=256, num_layers=4, rope_max_seq_len=256,
    )  # fmt: skip


def train_teacher(work: Path, sizes: dict) -> Path:
    from diffusers import WanTransformer3DModel

    from streamify.data.shapes import clip_latents, label_condition, shapes_clips
    from streamify.distill.flow_matching import train_on_clips
    from streamify.distill.trainer import TrainParams

    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**wan_config())
    clips = shapes_clips("train", sizes["clips"], TRAIN_FRAMES, SIZE)
    latents = torch.cat([clip_latents(clip) for clip in clips])
    conditions = torch.stack([label_condition(clip, TOKENS, TEXT_DIM) for clip in clips])
    params = TrainParams(steps=sizes["teacher"], lr=1e-3, warmup_steps=50, batch_size=32, grad_accum=1)
    result = train_on_clips(teacher, latents, conditions, params, seed=0, condition_dropout=CONDITION_DROPOUT)
    teacher.save_pretrained(work / "teacher")
    print(f"teacher: {sizes['teacher']} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}", flush=True)
    return work / "teacher"


def causal(teacher: Path):
    from streamify.io.load import load_checkpoint
    from streamify.runtime.causal_video import VideoSpec, enable_causal_video

    checkpoint = load_checkpoint(str(teacher))
    enable_causal_video(checkpoint.model, VideoSpec(CHUNK, SINKS, WINDOW))
    return checkpoint


def save_causal(checkpoint, folder: Path) -> Path:
    from streamify.runtime.causal_video import CONFIG_KEY

    model = checkpoint.model
    model.register_to_config(**{CONFIG_KEY: model.streamify_video.spec.to_json()})
    model.save_pretrained(folder)
    return folder


def train_forced(teacher: Path, work: Path, sizes: dict) -> Path:
    from streamify.data.shapes import clip_latents, label_condition, shapes_clips
    from streamify.distill.flow_matching import train_on_clips
    from streamify.distill.trainer import TrainParams

    checkpoint = causal(teacher)
    clips = shapes_clips("train", sizes["clips"], TRAIN_FRAMES, SIZE)
    latents = torch.cat([clip_latents(clip) for clip in clips])
    conditions = torch.stack([label_condition(clip, TOKENS, TEXT_DIM) for clip in clips])
    params = TrainParams(steps=sizes["forced"], lr=3e-4, warmup_steps=20, batch_size=16, grad_accum=1)
    result = train_on_clips(checkpoint.model, latents, conditions, params, seed=1, condition_dropout=CONDITION_DROPOUT)
    print(f"diffusion-forced: {sizes['forced']} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    return save_causal(checkpoint, work / "forced")


def train_self_forcing(teacher: Path, work: Path, sizes: dict, guidance: float) -> tuple[Path, dict]:
    from streamify.pipeline.registry import StageContext, get_stage

    checkpoint = causal(teacher)
    clip = {"frames": TRAIN_FRAMES, "height": SIZE, "width": SIZE, "condition_tokens": TOKENS}
    metrics = {}
    for name, params in (
        (
            "distill.ode_init",
            dict(samples=sizes["ode_samples"], heldout_samples=8, steps=sizes["ode"], lr=3e-4, grad_accum=1,
                 batch_size=8, teacher_steps=TEACHER_STEPS, warmup_steps=20, guidance=guidance),
        ),
        (
            "distill.self_forcing",
            dict(samples=256, heldout_samples=8, steps=sizes["sf"], lr=1e-4, critic_lr=3e-4, critic_updates=5,
                 batch_size=4, timesteps=list(STUDENT_TIMESTEPS), ema=0.95, teacher=str(teacher),
                 guidance=guidance),
        ),
    ):  # fmt: skip
        stage = get_stage(name)
        ctx = StageContext(device=torch.device("cpu"), seed=0, data="builtin:shapes", use_cache=False)
        started = time.perf_counter()
        checkpoint = stage.run(checkpoint, stage.params(**params, **clip), ctx)
        held = {k: ctx.metrics[k] for k in ("heldout_loss_before", "heldout_loss_after")}
        metrics[name] = {**held, "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: {metrics[name]}", flush=True)
    return save_causal(checkpoint, work / "self-forcing"), metrics


def generate_one(model: str, frames: int, clips: int, euler: bool, guidance: float) -> dict:
    """In this (fresh) process: generate ``clips`` held-out labels' clips of ``frames`` frames; the measures."""
    from streamify.data.shapes import (
        clip_features,
        colour_error,
        label_condition,
        latents_frames,
        shapes_clips,
        trajectory_error,
    )
    from streamify.io.load import load_checkpoint
    from streamify.runtime.video_generate import VideoRequest, generate_video

    torch.set_num_threads(2)
    checkpoint = load_checkpoint(model)
    labels = shapes_clips("heldout", clips, 1, SIZE)
    warm = VideoRequest(2 * CHUNK, SIZE, SIZE, STUDENT_TIMESTEPS, 2, euler=euler, guidance=guidance)  # not timed
    generate_video(checkpoint.model, label_condition(labels[0], TOKENS, TEXT_DIM)[None], warm)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS counts from here: generation only
    trajectory, colour, features, reports = [], [], [], []
    for index, label in enumerate(labels):
        request = VideoRequest(
            frames, SIZE, SIZE, STUDENT_TIMESTEPS, TEACHER_STEPS, seed=index, euler=euler, guidance=guidance
        )
        latents, report = generate_video(checkpoint.model, label_condition(label, TOKENS, TEXT_DIM)[None], request)
        pixels = latents_frames(latents)
        trajectory.append(trajectory_error(pixels, label.direction))
        colour.append(colour_error(pixels, label.colour))
        features.append(clip_features(pixels).tolist())
        reports.append(report)
    seconds = sum(r["seconds"] for r in reports)
    return {
        "trajectory_error": sum(trajectory) / clips,
        "colour_error": sum(colour) / clips,
        "features": features,
        "evaluations_per_frame": reports[0]["evaluations_per_frame"],
        "frames_per_s": clips * frames / seconds,
        "cache_bytes_max": reports[0].get("cache_bytes_max"),
        "peak_rss_mib": _peak_rss_kib() / 1024,
    }


def _peak_rss_kib() -> int:
    """The process's peak resident memory since the last reset (``VmHWM``, Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1])


def measure(model: Path, frames: int, clips: int, euler: bool, guidance: float) -> dict:
    command = [sys.executable, __file__, "--generate", str(model), "--frames", str(frames), "--clips", str(clips)]
    command += ["--guidance", str(guidance)]
    done = subprocess.run(command + (["--euler"] if euler else []), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def frechet_to_real(features: list, frames: int) -> float:
    from streamify.data.shapes import clip_features, frechet_distance, shapes_clips

    real = torch.stack([clip_features(c.frames) for c in shapes_clips("heldout", 64, frames, SIZE)])
    return frechet_distance(torch.tensor(features), real)


def references(clips: int) -> dict:
    """Trajectory errors of real held-out clips: as they are, with their frames shuffled in time (no coherent
    motion), and with the first frame held still (no motion), at each length."""
    from streamify.data.shapes import shapes_clips, trajectory_error

    generator = torch.Generator().manual_seed(0)
    out = {}
    for horizon in HORIZONS:
        frames = horizon * TRAIN_FRAMES
        real = shapes_clips("heldout", clips, frames, SIZE)
        variants = {
            "real": [c.frames for c in real],
            "shuffled": [c.frames[torch.randperm(frames, generator=generator)] for c in real],
            "still": [c.frames[:1].expand(frames, -1, -1, -1) for c in real],
        }
        out[f"{horizon}x"] = {
            name: round(sum(trajectory_error(f, c.direction) for f, c in zip(v, real, strict=True)) / clips, 2)
            for name, v in variants.items()
        }
    return out


def direction_probe(teacher: Path, clips: int, guidance: float) -> dict:
    """Does the teacher use the label's direction? On held-out clips, with the same noise: its flow-matching loss
    at several levels with the true label, the label naming the opposite direction and no label; and the
    trajectory error of clips noised to a level and sampled back to 0 (48 Euler steps over the rest, guided) with
    the true or the opposite label (SDEdit: from 1, a sample from noise)."""
    from streamify.data.shapes import (
        DIRECTIONS,
        Label,
        clip_latents,
        label_condition,
        latents_frames,
        shapes_clips,
        trajectory_error,
    )
    from streamify.io.load import load_checkpoint
    from streamify.runtime.video_sampling import noised, sample_clip, velocity

    model = load_checkpoint(str(teacher)).model
    real = shapes_clips("heldout", clips, TRAIN_FRAMES, SIZE)
    reverse = {tuple(-v for v in vector): name for name, vector in DIRECTIONS.items()}
    opposite = [Label(c.shape, c.colour, reverse[DIRECTIONS[c.direction]]) for c in real]
    clean = torch.cat([clip_latents(c) for c in real])
    labels = {
        "true": torch.stack([label_condition(c, TOKENS, TEXT_DIM) for c in real]),
        "opposite": torch.stack([label_condition(c, TOKENS, TEXT_DIM) for c in opposite]),
    }
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    out = {"loss": {}, "sdedit_trajectory_error": {}}
    with torch.no_grad():
        for level in (0.1, 0.3, 0.5, 0.7, 0.9):
            x = noised(clean, noise, torch.full((clips,), level))
            conditions = {**labels, "none": torch.zeros_like(labels["true"])}
            out["loss"][str(level)] = {
                name: round(float((velocity(model, x, c, level) - (noise - clean)).pow(2).mean()), 4)
                for name, c in conditions.items()
            }
    for start in (0.5, 0.8, 1.0):
        levels = [start * (1 - i / TEACHER_STEPS) for i in range(TEACHER_STEPS + 1)]
        x = noised(clean, noise, torch.full((clips,), start))
        out["sdedit_trajectory_error"][str(start)] = {
            name: round(
                sum(
                    trajectory_error(latents_frames(sample[None]), clip.direction)
                    for sample, clip in zip(sample_clip(model, x, c, levels, guidance=guidance)[0], real, strict=True)
                ) / clips, 2,
            )
            for name, c in labels.items()
        }  # fmt: skip
    return out


def bayes_optimal(clips: int, levels: tuple[float, ...] = ORACLE_LEVELS) -> dict:
    """The flow-matching loss of the best possible denoiser on the probe's held-out clips and noise, with and
    without the label's direction: ``builtin:shapes`` is a finite set of clips (a start on a grid of
    ``start_positions`` per axis), so the posterior mean of the clean clip given the noisy one is exact, a
    softmax over the clips the label allows (shape and colour, and the direction or any of them). For scale,
    also the loss of the mean of the clips of the label's shape and colour, a denoiser that never looks at
    where the shape is."""
    from streamify.data.shapes import DIRECTIONS, clip_latents, draw_clip, shapes_clips, start_positions

    real = shapes_clips("heldout", clips, TRAIN_FRAMES, SIZE)
    clean = torch.cat([clip_latents(c) for c in real])
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))  # the probe's noise
    starts = [(x, y) for x in start_positions(SIZE) for y in start_positions(SIZE)]
    drawn = {}

    def candidates(shape: str, colour: str, directions) -> torch.Tensor:
        for direction in directions:
            if (shape, colour, direction) not in drawn:
                drawn[shape, colour, direction] = torch.cat(
                    [clip_latents(draw_clip(shape, colour, direction, s, TRAIN_FRAMES, SIZE)) for s in starts]
                ).flatten(1)
        return torch.cat([drawn[shape, colour, d] for d in directions]).double()

    out = {}
    for level in levels:
        noisy = (1 - level) * clean + level * noise
        losses = {"with direction": 0.0, "without direction": 0.0, "position-blind": 0.0}
        for index, clip in enumerate(real):
            x, target = noisy[index].flatten().double(), clean[index].flatten().double()
            for name, directions in (("with direction", [clip.direction]), ("without direction", DIRECTIONS)):
                allowed = candidates(clip.shape, clip.colour, directions)
                weights = torch.softmax(-(x - (1 - level) * allowed).pow(2).sum(1) / (2 * level**2), dim=0)
                # the velocity error is the clean clip's error over the level: v = (x_s - x_0) / s
                losses[name] += float((weights @ allowed - target).pow(2).mean()) / level**2 / clips
            blind = candidates(clip.shape, clip.colour, DIRECTIONS).mean(0)  # ignores the noisy clip
            losses["position-blind"] += float((blind - target).pow(2).mean()) / level**2 / clips
        out[str(level)] = {name: round(value, 4) for name, value in losses.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the models here; a teacher or forced student there is reused"
    )
    parser.add_argument("--references", action="store_true", help="only the trajectory errors of real clips")
    parser.add_argument(
        "--sweep", default=None, help="only the teacher in --work at its training length, at these guidance scales"
    )
    parser.add_argument(
        "--probe", action="store_true", help="only whether the teacher in --work uses the label's direction"
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="only the best possible denoiser's loss (with and without direction) and a position-blind one's",
    )
    parser.add_argument(
        "--guidance", type=float, default=GUIDANCE, help="the teacher's and diffusion-forced student's guidance"
    )
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--clips", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--euler", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(generate_one(args.generate, args.frames, args.clips, args.euler, args.guidance)))
        return
    torch.set_num_threads(2)
    sizes = QUICK if args.quick else FULL
    if args.references:
        print(json.dumps(references(sizes["eval"])))
        return
    if args.oracle:
        print(json.dumps(bayes_optimal(2 * sizes["eval"]), indent=1))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="self-forcing-"))
    if (args.sweep or args.probe) and args.work is None:
        parser.error("--sweep and --probe measure the teacher of --work DIR")
    if args.probe:
        print(json.dumps(direction_probe(work / "teacher", 2 * sizes["eval"], args.guidance), indent=1))
        return
    if args.sweep:
        for guidance in map(float, args.sweep.split(",")):
            result = measure(work / "teacher", TRAIN_FRAMES, sizes["eval"], False, guidance)
            print(f"guidance {guidance:g}: trajectory error {result['trajectory_error']:.2f} px, colour error "
                  f"{result['colour_error']:.3f}")  # fmt: skip
        return
    started = time.perf_counter()
    teacher = work / "teacher" if (work / "teacher").is_dir() else train_teacher(work, sizes)
    forced = work / "forced" if (work / "forced").is_dir() else train_forced(teacher, work, sizes)
    student, training = train_self_forcing(teacher, work, sizes, args.guidance)
    rows = {}
    for name, model, euler, guidance in (
        ("teacher", teacher, False, args.guidance),
        ("diffusion-forced", forced, True, args.guidance),
        ("self-forcing", student, False, 1.0),  # the guidance is distilled into it
    ):
        for horizon in HORIZONS:
            frames = horizon * TRAIN_FRAMES
            result = measure(model, frames, sizes["eval"], euler, guidance)
            result["frechet"] = frechet_to_real(result.pop("features"), frames)
            rows[f"{name} {horizon}x"] = result
            print(name, f"{horizon}x", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    summary = {"sizes": sizes, "guidance": args.guidance, "training": training, "rows": rows}
    summary["references"] = references(sizes["eval"])
    summary["seconds"] = round(time.perf_counter() - started)
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {work / 'results.json'}")
    print(
        "| model | length | trajectory error (px) | colour error | Fréchet | evaluations/frame | frames/s | cache | "
        "peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        name, length = key.rsplit(" ", 1)
        cache = f"{r['cache_bytes_max'] / 2**10:.0f} KiB" if r["cache_bytes_max"] else "none"
        print(
            f"| {name} | {length} | {r['trajectory_error']:.2f} | {r['colour_error']:.3f} | {r['frechet']:.3f} | "
            f"{r['evaluations_per_frame']:.2f} | {r['frames_per_s']:.2f} | {cache} | {r['peak_rss_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
