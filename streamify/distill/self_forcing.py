"""Stage ``distill.self_forcing``: a block-causal video student trained on its own autoregressive rollouts (DMD).

Self-Forcing (Huang et al. 2025): each training step the student generates
clips chunk by chunk exactly as at inference, over its own cache (with the
student's sinks + rolling window, if it has them: MotionStream's training with
a rolling cache), with the few-step schedule ``timesteps``. In every chunk one
randomly chosen level keeps its gradient, the levels before it run without,
and a clean re-run at level 0 writes the chunk to the cache. The clip is
scored by distribution matching (:mod:`streamify.distill.dmd`) against the
frozen bidirectional teacher, with a critic (initialised from the teacher)
that learns the student's distribution with its own optimizer,
``critic_updates`` steps of it per student step. The teacher's "real" score
can be guided (``guidance``, classifier-free), so the student learns the guided
distribution and samples it unguided. The student's weights can end as an
exponential moving average (``ema``). Only conditions are needed, no clips.

The held-out loss is the teacher's flow-matching loss on the student's
rollouts for held-out conditions (seeded noise and levels): a bound on the
negative log-likelihood of the student's clips under the teacher, which
distribution matching lowers. With ``guidance`` the student aims at the guided
distribution, which this unguided measure does not score exactly.
"""

from __future__ import annotations

import copy
import hashlib
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from streamify.distill.dmd import critic_loss, dmd_loss
from streamify.distill.trainer import Companion, result_params, train
from streamify.distill.video_setup import (
    TRAINING_BYTES_PER_PARAM,
    VideoDistillParams,
    clip_shape,
    load_teacher,
    negative_tokens,
    require_causal_student,
    train_and_heldout,
)
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.model.fingerprint import content_key
from streamify.pipeline.registry import StageContext, register
from streamify.runtime.causal_video import TIMESTEPS_KEY, video_parts
from streamify.runtime.video_sampling import chunk_length, negative_condition, noised, rollout, velocity

HELDOUT_SEED = 54_321
HELDOUT_LEVELS = (0.1, 0.2, 0.3)  # low: there the teacher's loss says whether a clip lies where its data does


class SelfForcingParams(VideoDistillParams):
    """Params of ``distill.self_forcing``."""

    steps: int = Field(100, ge=1, description="student (generator) steps")
    lr: float = Field(5e-5, gt=0, description="the student's peak learning rate")
    grad_accum: int = Field(1, ge=1, description="rollouts per student step")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="decay after warmup")
    timesteps: list[float] = Field(
        [1000, 750, 500, 250], min_length=1, description="the student's few-step schedule, timesteps from 1000 down"
    )
    critic_lr: float = Field(5e-5, gt=0, description="the critic's learning rate (constant)")
    critic_updates: int = Field(5, ge=1, description="critic steps per student step (DMD2, Self-Forcing: 5)")
    ema: float | None = Field(None, gt=0, lt=1, description="end with this moving average of the student's weights")
    dmd_min: float = Field(0.02, ge=0, lt=1, description="lowest noise level of the DMD scores")
    dmd_max: float = Field(0.98, gt=0, le=1, description="highest noise level of the DMD scores")

    @model_validator(mode="after")
    def _ordered(self) -> SelfForcingParams:
        if self.timesteps[0] != 1000 or any(b >= a for a, b in pairwise(self.timesteps)):
            raise ValueError(f"timesteps start at 1000 and decrease, got {self.timesteps}")
        if self.timesteps[-1] <= 0:
            raise ValueError("timesteps stay above 0 (level 0 is the clean cache re-run)")
        if self.dmd_min >= self.dmd_max:
            raise ValueError(f"dmd_min ({self.dmd_min}) must be below dmd_max ({self.dmd_max})")
        return self


@torch.no_grad()
def heldout_teacher_loss(student, teacher, conds: torch.Tensor, shape: tuple, sigmas: list[float]) -> float:
    """The teacher's flow-matching loss on the student's rollouts for ``conds``, seeded (module doc)."""
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    device = next(student.parameters()).device
    losses = []
    for index in range(conds.shape[0]):
        condition = conds[index : index + 1].to(device)
        noise = torch.randn(1, *shape, generator=generator).to(device)
        clip = rollout(student, noise, condition, sigmas, generator=generator)
        for level in HELDOUT_LEVELS:
            fresh = torch.randn(clip.shape, generator=generator).to(device)
            predicted = velocity(teacher, noised(clip, fresh, torch.tensor([level])), condition, level)
            losses.append(F.mse_loss(predicted, fresh - clip).item())
    return sum(losses) / len(losses)


def _holds(params: SelfForcingParams, model_bytes: int, count: int) -> tuple[int, str]:
    """For the plan: the student with its gradients and AdamW, the frozen teacher (counted at the student's
    size and dtype), the critic in fp32 with its own, and the fp32 moving average."""
    total = 2 * model_bytes + TRAINING_BYTES_PER_PARAM * count + (4 + TRAINING_BYTES_PER_PARAM) * count
    held = "the student with its gradients and AdamW, a frozen teacher, a critic in fp32 with its gradients and AdamW"
    if params.ema is not None:
        total += 4 * count
        held += ", an fp32 moving average"
    return total, held + " (activations not counted)"


def _plan_check(params: SelfForcingParams, model, where: str) -> dict:
    video_parts(model, where)
    return {"timesteps": params.timesteps, "critic_updates": params.critic_updates}


@register(
    "distill.self_forcing",
    SelfForcingParams,
    "self-forcing distillation of a block-causal video student: its own rollouts, DMD against teacher and critic",
    relation="finetune",
    kinds=("denoiser",),
    trains=lambda p: True,
    check=_plan_check,
    holds=_holds,
)
def distill_self_forcing(checkpoint: Checkpoint, params: SelfForcingParams, ctx: StageContext) -> Checkpoint:
    """Train the block-causal student on its own rollouts against the teacher and a critic."""
    student, where = checkpoint.model, checkpoint.source.spec
    hint = "run convert.causal_video (and distill.ode_init) before it"
    require_causal_student(student, "distill.self_forcing", where, hint)
    shape = clip_shape(student, params, "distill.self_forcing")
    spec = params.teacher or where  # default: the run's input model
    teacher = load_teacher(spec, student, ctx.device, ctx.progress, "distill.self_forcing")
    critic = copy.deepcopy(teacher).float()
    for param in critic.parameters():
        param.requires_grad_(True)
    train_conds, held_conds = train_and_heldout(ctx.data, student.config, params, ctx.progress)
    sigmas = [t / 1000 for t in params.timesteps]
    chunks = params.frames // chunk_length(student)
    device = next(student.parameters()).device
    before = heldout_teacher_loss(student, teacher, held_conds, shape, sigmas)

    def generated(batch: torch.Tensor, with_gradient: bool) -> tuple[torch.Tensor, torch.Tensor]:
        condition = train_conds[batch[:, 0].cpu()].to(device)
        noise = torch.randn(batch.shape[0], *shape, device=device)
        exits = torch.randint(len(sigmas), (chunks,)).tolist()
        with torch.set_grad_enabled(with_gradient):
            return rollout(student, noise, condition, sigmas, exits=exits), condition

    def student_loss(batch: torch.Tensor) -> torch.Tensor:
        clip, condition = generated(batch, True)
        return dmd_loss(clip, condition, teacher, critic, params.dmd_min, params.dmd_max, params.guidance)

    def critic_step_loss(batch: torch.Tensor) -> torch.Tensor:
        clip, condition = generated(batch, False)
        return critic_loss(critic, clip, condition)

    for param in student.parameters():
        param.requires_grad_(True)
    key = {"phase": "self_forcing", "params": result_params(params), "shape": shape, "data": ctx.data, "seed": ctx.seed}
    negative = negative_tokens(ctx.data, train_conds) if params.guidance != 1.0 else None
    if negative is not None:  # the real score's unconditional branch: a negative prompt's states
        key["negative"] = hashlib.sha256(negative.numpy().tobytes()).hexdigest()
    checkpoint_dir = cache_root() / "train" / content_key(student, {**key, "teacher": content_key(teacher, {})})
    ctx.progress.log(
        f"self-forcing: {params.steps} student steps, {params.critic_updates} critic steps each, "
        f"{len(sigmas)}-step rollouts of {chunks} chunks"
    )
    torch.manual_seed(ctx.seed)  # the rollouts' noise, levels and exits (checkpoints keep the random states)
    with negative_condition(teacher, negative):
        result = train(
            student,
            torch.arange(params.samples)[:, None],
            student_loss,
            params,
            seed=ctx.seed,
            checkpoint_dir=checkpoint_dir if ctx.use_cache else None,
            progress=ctx.progress,
            companion=Companion(critic, critic_step_loss, params.critic_lr, params.critic_updates),
            ema_decay=params.ema,
        )
    for name, param in student.named_parameters():
        param.requires_grad_(False)
        if result.ema is not None:
            param.data.copy_(result.ema[name])
    student.register_to_config(**{TIMESTEPS_KEY: list(params.timesteps)})  # generate's default schedule
    ctx.metrics.update(
        timesteps=params.timesteps,
        critic_updates=params.critic_updates,
        ema=params.ema,
        self_forcing_steps=result.steps,
        self_forcing_resumed_from_step=result.resumed_from,
        dmd_losses=result.losses,
        critic_losses=result.companion_losses,
        heldout_loss_before=round(before, 6),
        heldout_loss_after=round(heldout_teacher_loss(student, teacher, held_conds, shape, sigmas), 6),
        heldout_loss="teacher flow-matching loss on the student's held-out rollouts",
    )
    return checkpoint
