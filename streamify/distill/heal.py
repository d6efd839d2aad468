"""Healing: distil a modified student (streaming, pruned) back towards its original teacher.

Loss: KL(teacher || student) on logits (+ optional next-token CE), trained
with LoRA adapters (merged at the end) or all weights, by the shared
:func:`~streamify.distill.trainer.train` loop. Held-out KL to the teacher is
measured before and after, on text the training never saw.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from pydantic import Field

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.distill.lora import add_lora, merge_lora
from streamify.distill.losses import heldout_kl, hidden_mse, kl_to_teacher, next_token_ce
from streamify.distill.trainer import TrainParams, result_params, train
from streamify.errors import UsageError
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.io.load import load_teacher_checkpoint
from streamify.io.placement import DTYPE_NAMES, teacher_dtype
from streamify.model.blocks import block_list
from streamify.model.fingerprint import content_key
from streamify.model.hooks import recording
from streamify.model.patterns import select_modules
from streamify.pipeline.registry import StageContext, register
from streamify.progress import SILENT, Progress
from streamify.runtime.attention import disable_streaming, enable_streaming
from streamify.runtime.spec import read_spec


class HealParams(TrainParams):
    """Healing: the training settings plus what to train and on what loss."""

    lora_rank: int = Field(16, ge=0, description="LoRA rank on every linear layer but the head (0: train all weights)")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    lora_targets: list[str] | None = Field(
        None, description="module patterns LoRA adapts (default: every linear layer but the head)"
    )
    lora_ignore: list[str] = Field(default_factory=list, description="module patterns LoRA leaves alone")
    seq_len: int | None = Field(None, ge=2, description="training sequence length (default: the stage's)")
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on logits")
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token cross-entropy")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of per-block hidden-state MSE to the teacher (layer-wise; pruning only)"
    )
    eval_blocks: int = Field(4, ge=1, description="held-out sequences for the KL measured before and after")
    teacher_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="dtype of a separate (frozen) teacher; auto: bf16 on a GPU that supports it, else the student's",
    )


@contextmanager
def _as_original(model: torch.nn.Module, trainee: torch.nn.Module) -> Iterator[None]:
    """A streaming student as it was before healing: LoRA adapters off (when added), full attention."""
    spec = model.streamify_controller.spec
    disable_streaming(model)
    try:
        with trainee.disable_adapter() if trainee is not model else nullcontext():
            yield
    finally:
        enable_streaming(model, spec)


def heal(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer,
    params: HealParams,
    *,
    seq_len: int,
    data: str,
    seed: int,
    block_map: list[int] | None = None,
    resumable: bool = True,
    progress: Progress = SILENT,
) -> tuple[torch.nn.Module, dict]:
    """Train ``student`` towards ``teacher`` on ``data``; returns the healed plain model and its metrics.

    ``teacher`` None: a streaming student learns from itself with full
    attention and its LoRA adapters off (peft's ``disable_adapter``), so no
    copy of the model is held; it needs ``lora_rank`` > 0, since training all
    weights changes the teacher too. ``block_map[j]`` is the teacher block
    whose output student block ``j`` imitates when ``hidden_weight`` > 0
    (relative MSE, mean over blocks; needs a separate teacher).

    With ``resumable``, a run killed mid-way resumes from its checkpoint in
    streamify's cache (keyed by the student's weights, the params, data and seed).
    """
    seq_len = params.seq_len or seq_len
    needed = params.steps * params.batch_size * params.grad_accum * seq_len
    where = f"--data {data}"
    train_blocks = token_blocks(tokenizer, load_texts(data, "train"), seq_len, needed, seed=seed, where=where)
    eval_tokens = params.eval_blocks * seq_len
    eval_ids = token_blocks(tokenizer, load_texts(data, "heldout"), seq_len, eval_tokens, where=where)
    unique = train_blocks.numel()
    if unique < needed:
        progress.log(
            f"healing: {data} holds {unique:,} training tokens, fewer than the {needed:,} the steps take: "
            f"they are repeated ({needed / unique:.1f} epochs)"
        )
    if eval_ids.numel() < eval_tokens:
        progress.log(f"healing: held-out KL on {eval_ids.numel():,} tokens, not the {eval_tokens:,} asked")
    if teacher is None and (not params.lora_rank or getattr(student, "streamify_controller", None) is None):
        raise UsageError(
            "healing without a separate teacher needs a streaming student trained through LoRA (lora_rank > 0)",
            "set lora_rank > 0, or give the teacher",
        )
    if teacher is not None:
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher.to(teacher_dtype(params.teacher_dtype, next(student.parameters())))
    device = next(student.parameters()).device
    progress.log("measuring held-out KL to the teacher before healing")
    kl_before = heldout_kl(
        lambda ids: student(ids).logits, _teacher_logits(teacher, student, student), eval_ids, device
    )
    settings = {"params": result_params(params), "seq_len": seq_len, "data": data, "seed": seed}
    checkpoint_dir = cache_root() / "train" / content_key(student, settings) if resumable else None
    targets = select_modules(student, params.lora_targets, params.lora_ignore, "heal: lora_targets/lora_ignore")
    trainee = add_lora(student, params.lora_rank, params.lora_alpha, targets)
    teacher_logits = _teacher_logits(teacher, student, trainee)

    layerwise = bool(params.hidden_weight and block_map and teacher is not None)
    teacher_blocks = block_list(teacher, "teacher")[1] if layerwise else None
    student_blocks = block_list(trainee, "student")[1] if layerwise else None

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        teacher_states: list[torch.Tensor] = []
        student_states: list[torch.Tensor] = []
        with torch.no_grad(), recording(teacher_blocks, teacher_states) if layerwise else nullcontext():
            target = teacher_logits(batch)
        with recording(student_blocks, student_states, detach=False) if layerwise else nullcontext():
            logits = trainee(batch).logits
        loss = params.kl_weight * kl_to_teacher(logits, target, params.temperature)
        if params.ce_weight:
            loss = loss + params.ce_weight * next_token_ce(logits, batch)
        if layerwise:
            loss = loss + params.hidden_weight * hidden_mse(student_states, teacher_states, block_map)
        return loss

    result = train(trainee, train_blocks, loss_fn, params, seed=seed, checkpoint_dir=checkpoint_dir, progress=progress)
    kl_after = heldout_kl(lambda ids: trainee(ids).logits, teacher_logits, eval_ids, device)  # before the merge
    healed = merge_lora(trainee)
    metrics = {
        "heal_steps": result.steps,
        "heal_tokens": result.tokens,
        "heal_unique_tokens": unique,
        "heal_heldout_tokens": eval_ids.numel(),
        "heal_seq_len": seq_len,
        "heal_resumed_from_step": result.resumed_from,
        "heal_discarded_checkpoint": result.discarded_checkpoint,
        "heal_loss_first": result.losses[0] if result.losses else None,
        "heal_loss_last": result.losses[-1] if result.losses else None,
        "heal_losses": result.losses,  # the loss of every step (the JSON output and the manifest)
        "heal_teacher": "the student, adapters off" if teacher is None else _dtype_name(teacher),
        "heldout_kl_before": round(kl_before, 6),
        "heldout_kl_after": round(kl_after, 6),
    }
    return healed, metrics


def _dtype_name(model: torch.nn.Module) -> str:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return DTYPE_NAMES.get(dtype, str(dtype))


def _teacher_logits(teacher, student, trainee):
    """ids -> the teacher's logits: a separate teacher's, or the student's own as it was (:func:`_as_original`)."""
    if teacher is not None:
        return lambda ids: teacher(ids).logits

    def original(ids: torch.Tensor) -> torch.Tensor:
        with _as_original(student, trainee):
            return trainee(ids).logits

    return original


class DistillHealParams(HealParams):
    """Params of ``distill.heal``."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    teacher: str | None = Field(
        None, description="teacher MODEL (default: the input itself with full attention, for a streaming input)"
    )


@register(
    "distill.heal",
    DistillHealParams,
    "heal a modified model by distillation from a teacher (LoRA, merged)",
    relation="finetune",
    training=lambda p: (p, 512, p.teacher is not None or not p.lora_rank),
)
def distill_heal(checkpoint: Checkpoint, params: DistillHealParams, ctx: StageContext) -> Checkpoint:
    """Heal ``checkpoint`` towards ``params.teacher`` (or its own full-attention self when it streams)."""
    model = checkpoint.model
    spec = read_spec(model.config)
    if params.teacher is not None:
        dtype = DTYPE_NAMES.get(teacher_dtype(params.teacher_dtype, next(model.parameters())), "auto")
        teacher = load_teacher_checkpoint(
            params.teacher, "distill.heal", dtype=dtype, device=str(ctx.device), progress=ctx.progress
        ).model
    elif spec is not None and params.lora_rank:
        teacher = None  # the model itself, full attention, adapters off: no copy
    elif spec is not None:
        teacher = copy.deepcopy(model)  # all weights train: the original must be kept apart
        disable_streaming(teacher)
    else:
        raise UsageError(
            "distill.heal: the input is not a streaming model, so it has no full-attention self to learn from",
            "name the original model with teacher: MODEL (--teacher MODEL)",
        )
    default_len = 2 * (spec.sinks + spec.window) if spec is not None else 512
    train_params = HealParams(**params.model_dump(exclude={"teacher"}))
    healed, metrics = heal(
        model,
        teacher,
        checkpoint.tokenizer,
        train_params,
        seq_len=default_len,
        data=ctx.data,
        seed=ctx.seed,
        resumable=ctx.use_cache,
        progress=ctx.progress,
    )
    if spec is not None:
        enable_streaming(healed, spec)
    checkpoint.model = healed
    ctx.metrics.update(metrics)
    return checkpoint
