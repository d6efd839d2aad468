"""Stage ``distill.ode_init``: a block-causal video student learns to jump from the teacher's ODE states to the end.

Step one of Self-Forcing (after CausVid): the bidirectional teacher samples
``samples`` clips with ``teacher_steps`` Euler steps of its flow ODE (guided by
``guidance``, classifier-free, when it is not 1); the states
before the steps in ``keep`` (e.g. 0, 12, 24, 36 of 48) and the end are stored.
The student, the same weights under the block-causal mask, then learns to map
a clip whose every chunk sits at its own, randomly chosen stored state (stock
Wan's per-token timesteps carry one level per chunk) to the clean end (MSE).
The result is a few-step causal generator that :mod:`~streamify.distill.self_forcing`
refines.

The trajectories are the stage's cached output: each is written to the cache
as it is sampled, so an interrupted run samples only the missing ones, and the
training checkpoints like every training stage. Under several processes each
samples its share (every N-th trajectory) into the cache, which must then be on
a filesystem they all see, and all of them train on the whole set. The held-out loss (the same
regression on trajectories of held-out conditions, at seeded states) is
measured before and after training.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_file

from streamify.distill.trainer import result_params, train
from streamify.distill.video_setup import (
    TRAINING_BYTES_PER_PARAM,
    VideoDistillParams,
    clip_shape,
    load_teacher,
    negative_tokens,
    require_causal_student,
    train_and_heldout,
)
from streamify.errors import UsageError
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.io.safetensors_file import save_file_whole
from streamify.model.fingerprint import content_key
from streamify.pipeline.processes import launched_processes, process_state
from streamify.pipeline.registry import StageContext, register
from streamify.progress import SILENT
from streamify.runtime.causal_video import disable_causal_video, enable_causal_video, video_parts
from streamify.runtime.video_sampling import (
    chunk_length,
    negative_condition,
    predict_clean,
    sample_clip,
    shifted_sigmas,
)

HELDOUT_SEED = 12_345  # the held-out trajectories' noise and states, the same before and after training
SHARED_FILE_WAIT_S = 60  # how long a process waits for the others' trajectory files to show up


class OdeInitParams(VideoDistillParams):
    """Params of ``distill.ode_init``."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    teacher_steps: int = Field(48, ge=2, description="Euler steps of the teacher's sampling")
    keep: list[int] = Field(
        [0, 12, 24, 36], min_length=1, description="teacher steps whose states the student learns from (end: always)"
    )
    shift: float = Field(1.0, gt=0, description="flow shift of the teacher's schedule (Wan2.1 at 480p: 3)")

    @model_validator(mode="after")
    def _keep_in_range(self) -> OdeInitParams:
        if sorted(set(self.keep)) != self.keep or self.keep[0] < 0 or self.keep[-1] >= self.teacher_steps:
            raise ValueError(f"keep must be increasing steps in 0..{self.teacher_steps - 1}, got {self.keep}")
        return self


class Trajectories:
    """Stored teacher trajectories, ``[len(keep) + 1, C, F, H, W]`` each: files in the cache, read a batch at a
    time (a real run's trajectories outgrow memory), or tensors in memory when there is no cache."""

    def __init__(self, items: list[Path | torch.Tensor], sampled: int) -> None:
        self.items = items
        self.sampled = sampled  # how many this process sampled (the rest were stored already or are others')

    def missing(self) -> list[Path]:
        """Stored trajectories whose file is not there."""
        return [item for item in self.items if isinstance(item, Path) and not item.is_file()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, rows) -> torch.Tensor:
        """``[len(rows), kept + 1, C, F, H, W]``."""
        picked = [self.items[int(row)] for row in torch.as_tensor(rows).reshape(-1)]
        return torch.stack([item if isinstance(item, torch.Tensor) else load_file(item)["states"] for item in picked])


def trajectories(
    teacher,
    conds: torch.Tensor,
    shape: tuple,
    params: OdeInitParams,
    seed: int,
    folder: Path | None,
    progress,
    share: tuple[int, int] = (0, 1),
) -> Trajectories:
    """For each condition the teacher's states before the ``keep`` steps and its end, from seeded noise; each is
    written to ``folder`` when one is given, and one already there is not sampled again. With ``share`` (this
    process, processes) and a folder, only every processes-th trajectory from this one's index is sampled here;
    the others are the other processes' files."""
    sigmas = shifted_sigmas(params.teacher_steps, params.shift)
    device = next(teacher.parameters()).device
    items: list[Path | torch.Tensor] = []
    rank, world = share if folder is not None else (0, 1)
    sampled = 0
    for index in progress.track(range(conds.shape[0]), "teacher trajectories", total=conds.shape[0]):
        path = folder / f"trajectory-{index:06d}.safetensors" if folder is not None else None
        if path is not None and (path.is_file() or index % world != rank):
            items.append(path)
            continue
        noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))
        condition = conds[index : index + 1].to(device)
        end, kept = sample_clip(teacher, noise.to(device), condition, sigmas, params.keep, params.guidance)
        sampled += 1
        states = torch.cat([*kept, end]).cpu().contiguous()
        if path is None:
            items.append(states)
            continue
        save_file_whole({"states": states}, path)
        items.append(path)
    return Trajectories(items, sampled)


def regression_loss(student, states: torch.Tensor, conds: torch.Tensor, levels: list[float], generator=None):
    """MSE between the student's clean prediction and the trajectory's end, every chunk at a random stored state
    (``states`` ``[batch, kept + 1, C, F, H, W]``, ``levels`` the kept states' noise levels)."""
    batch, kept = states.shape[:2]
    kept -= 1
    step = chunk_length(student)
    patch_frames = student.streamify_video.patch[0]
    chunks = states.shape[3] // step
    choice = torch.randint(kept, (batch, chunks), generator=generator).to(states.device)
    per_frame = choice.repeat_interleave(step, dim=1)  # [batch, latent frames]
    index = per_frame[:, None, None, :, None, None].expand(batch, 1, *states.shape[2:])
    noisy = states[:, :-1].gather(1, index).squeeze(1)
    sigma = torch.tensor(levels, device=states.device)[choice].repeat_interleave(step // patch_frames, dim=1)
    clean = predict_clean(student, noisy, conds, sigma)
    return F.mse_loss(clean, states[:, -1].float())


@torch.no_grad()
def heldout_loss(student, states: Trajectories, conds: torch.Tensor, levels: list[float]) -> float:
    """:func:`regression_loss` over held-out trajectories at seeded states, one at a time."""
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    device = next(student.parameters()).device
    losses = [
        regression_loss(student, states[[i]].to(device), conds[i : i + 1].to(device), levels, generator).item()
        for i in range(len(states))
    ]
    return sum(losses) / len(losses)


def _holds(params: OdeInitParams, model_bytes: int, count: int) -> tuple[int, str]:
    """For the plan: the student and a named teacher while sampling, the student with its gradients and AdamW
    while training."""
    sampling = model_bytes * (2 if params.teacher is not None else 1)
    training = model_bytes + TRAINING_BYTES_PER_PARAM * count
    teacher = "a named teacher while sampling, then " if params.teacher is not None else ""
    return max(sampling, training), f"{teacher}the student with its gradients and AdamW (activations not counted)"


def _plan_check(params: OdeInitParams, model, where: str) -> dict:
    video_parts(model, where)
    return {"keep": params.keep, "teacher_steps": params.teacher_steps}


@register(
    "distill.ode_init",
    OdeInitParams,
    "ODE initialisation of a block-causal video student: regress the teacher's sampling trajectories' ends",
    relation="finetune",
    kinds=("denoiser",),
    trains=lambda p: True,
    check=_plan_check,
    holds=_holds,
)
def distill_ode_init(checkpoint: Checkpoint, params: OdeInitParams, ctx: StageContext) -> Checkpoint:
    """Sample teacher trajectories, then train the block-causal student to regress their ends."""
    student, where = checkpoint.model, checkpoint.source.spec
    hint = "run convert.causal_video before it (a recipe stage, or streamify convert causal-video)"
    require_causal_student(student, "distill.ode_init", where, hint)
    shape = clip_shape(student, params, "distill.ode_init")
    teacher = None  # the input itself with its stock attention, unless one is named
    if params.teacher is not None:
        teacher = load_teacher(params.teacher, student, ctx.device, ctx.progress, "distill.ode_init")
    train_conds, held_conds = train_and_heldout(ctx.data, student.config, params, ctx.progress)
    sampler = teacher if teacher is not None else student
    spec = student.streamify_video.spec
    if teacher is None:
        disable_causal_video(student)  # the input's own bidirectional attention samples the trajectories
    settings = {"shape": shape, "steps": params.teacher_steps, "keep": params.keep, "shift": params.shift}
    negative = negative_tokens(ctx.data, train_conds) if params.guidance != 1.0 else None
    if params.guidance != 1.0:  # (unguided trajectories keep the keys they had before guidance existed)
        settings["guidance"] = params.guidance
    if negative is not None:
        settings["negative"] = hashlib.sha256(negative.numpy().tobytes()).hexdigest()
    conds_hash = hashlib.sha256(torch.cat((train_conds, held_conds)).numpy().tobytes()).hexdigest()
    key = content_key(sampler, {**settings, "conditions": conds_hash, "seed": ctx.seed})
    folder = cache_root() / "trajectories" / key if ctx.use_cache else None
    try:
        with negative_condition(sampler, negative):
            train_states, held_states = _sample(sampler, (train_conds, held_conds), shape, params, folder, ctx)
    finally:
        if teacher is None:
            enable_causal_video(student, spec, where)
    del teacher, sampler  # a named teacher is not needed for the training
    sigmas = shifted_sigmas(params.teacher_steps, params.shift)
    levels = [sigmas[i] for i in params.keep]
    before = heldout_loss(student, held_states, held_conds, levels)
    device = next(student.parameters()).device
    for param in student.parameters():
        param.requires_grad_(True)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        rows = batch[:, 0].cpu()
        return regression_loss(student, train_states[rows].to(device), train_conds[rows].to(device), levels)

    train_key = {
        "phase": "ode_init",
        "params": result_params(params),
        **settings,
        "trajectories": key,
        "seed": ctx.seed,
    }
    checkpoint_dir = cache_root() / "train" / content_key(student, train_key) if ctx.use_cache else None
    ctx.progress.log(f"training the causal student on the trajectories ({params.steps} steps)")
    indices = torch.arange(params.samples)[:, None]
    torch.manual_seed(ctx.seed)  # the chunks' states (checkpoints keep the random states)
    result = train(
        student, indices, loss_fn, params, seed=ctx.seed, checkpoint_dir=checkpoint_dir, progress=ctx.progress
    )
    for param in student.parameters():
        param.requires_grad_(False)
    ctx.metrics.update(
        trajectories=params.samples,
        heldout_trajectories=params.heldout_samples,
        trajectories_sampled_here=train_states.sampled + held_states.sampled,
        teacher_steps=params.teacher_steps,
        keep=params.keep,
        levels=[round(level, 6) for level in levels],
        ode_steps=result.steps,
        ode_resumed_from_step=result.resumed_from,
        ode_loss_first=result.losses[0] if result.losses else None,
        ode_loss_last=result.losses[-1] if result.losses else None,
        ode_losses=result.losses,
        heldout_loss_before=round(before, 6),
        heldout_loss_after=round(heldout_loss(student, held_states, held_conds, levels), 6),
    )
    return checkpoint


def _sample(sampler, conds: tuple, shape: tuple, params: OdeInitParams, folder: Path | None, ctx: StageContext):
    """The train and held-out trajectories. Under several processes each samples its share into the cache
    ``folder`` and waits for the others' (all raise together when some are not there)."""
    state = process_state(ctx.device) if launched_processes() > 1 else None
    if state is not None and folder is None:
        raise UsageError(
            f"distill.ode_init: {state.num_processes} processes share the teacher trajectories through the stage "
            "cache, which is off",
            "run with the cache on (without --no-cache), on a filesystem every process sees",
        )
    share = (state.process_index, state.num_processes) if state is not None else (0, 1)
    ctx.progress.log(f"sampling {params.samples + params.heldout_samples} teacher trajectories")
    train = trajectories(sampler, conds[0], shape, params, ctx.seed, _part(folder, "train"), ctx.progress, share)
    held = trajectories(sampler, conds[1], shape, params, HELDOUT_SEED, _part(folder, "heldout"), SILENT, share)
    if state is None:
        return train, held
    from accelerate.utils import gather_object

    state.wait_for_everyone()  # the other processes' shares are written
    missing = train.missing() + held.missing()
    for _ in range(SHARED_FILE_WAIT_S):  # a network filesystem may show new files late
        if not missing:
            break
        time.sleep(1)
        missing = train.missing() + held.missing()
    if any(gather_object([len(missing)])):
        raise UsageError(
            f"distill.ode_init: trajectories other processes sampled are not in {folder}"
            + (f" (here: {len(missing)}, e.g. {missing[0].name})" if missing else ""),
            "put the cache on a filesystem every process sees (STREAMIFY_CACHE_DIR)",
        )
    return train, held


def _part(folder: Path | None, split: str) -> Path | None:
    return folder / split if folder is not None else None
