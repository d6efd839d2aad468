"""The project's one training loop: seeded, gradient accumulation, lr schedule, checkpoint/resume.

Every training stage (healing after streaming conversion or depth pruning,
and later distillation stages) calls :func:`train` with a loss function of one
batch; the loop owns the optimizer, the schedule, the batches' order and the
checkpoints, so a killed run resumes where it stopped and ends with the same
weights as an uninterrupted one (the batch of step ``i`` depends only on the
seed and ``i``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from streamify.errors import UsageError
from streamify.progress import SILENT, Progress

CHECKPOINT_NAME = "train_state.pt"


class TrainParams(BaseModel):
    """Optimisation settings shared by the training stages."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(0, ge=0, description="optimizer steps (0: no training)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    batch_size: int = Field(1, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    checkpoint_every: int = Field(25, ge=1, description="save a resumable checkpoint every N steps")
    autocast: Literal["off", "bf16"] = Field(
        "off",
        description="bf16: forward passes under torch.autocast in bf16 (weights, gradients and optimizer stay "
        "fp32); faster on GPUs and on CPUs with bf16 units, at slightly noisier gradients",
    )


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    resumed_from: int
    losses: list[float]
    tokens: int
    discarded_checkpoint: bool = False  # a checkpoint for other parameters was found and not used


def lr_factor(step: int, params: TrainParams) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then the schedule's decay."""
    if step < params.warmup_steps:
        return (step + 1) / (params.warmup_steps + 1)
    if params.schedule == "constant":
        return 1.0
    progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
    if params.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, micro: int, params: TrainParams, num_blocks: int, seed: int) -> torch.Tensor:
    """Indices of the blocks for micro-batch ``micro`` of ``step``: a seeded permutation per epoch."""
    first = (step * params.grad_accum + micro) * params.batch_size
    out = []
    for position in range(first, first + params.batch_size):
        epoch, offset = divmod(position, num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(order[offset])
    return torch.stack(out)


def train(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: TrainParams,
    *,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: Progress = SILENT,
) -> TrainResult:
    """Train ``model``'s parameters that require grad on ``blocks`` (token ids ``[n, seq_len]``).

    ``loss_fn(batch)`` returns the scalar loss of one micro-batch (ids on the
    model's device). With ``checkpoint_dir``, the trainable weights, optimizer
    and step are saved every ``checkpoint_every`` steps and a later call with
    the same directory resumes from them; the directory is removed at the end.
    """
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    half_types = (torch.bfloat16, torch.float16)
    half = sorted({str(p.dtype).removeprefix("torch.") for p in trainable if p.dtype in half_types})
    if half:
        raise UsageError(
            f"training would update {', '.join(half)} weights in place, and AdamW steps smaller than their "
            "precision would be lost (no fp32 master weights)",
            "load the model in fp32 (--dtype fp32) and train with --heal-autocast bf16 (recipe: autocast) for "
            "bf16 speed, or train LoRA adapters (lora_rank > 0), which stay fp32",
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, params))
    start, losses, discarded = _resume(checkpoint_dir, model, names, optimizer, scheduler)
    if discarded:
        progress.log(
            f"training: the checkpoint {checkpoint_dir / CHECKPOINT_NAME} holds other parameters than this "
            "model trains, so it is not resumed: training starts at step 0"
        )
    if start:
        progress.log(f"training: resumed at step {start}/{params.steps} from {checkpoint_dir / CHECKPOINT_NAME}")
    model.train()
    mixed = torch.autocast(device.type, dtype=torch.bfloat16) if params.autocast == "bf16" else nullcontext()
    for step in progress.track(range(start, params.steps), "training", total=params.steps - start):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(params.grad_accum):
            batch = blocks[batch_indices(step, micro, params, blocks.shape[0], seed)].to(device)
            with mixed:
                loss = loss_fn(batch) / params.grad_accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(round(step_loss, 6))
        if checkpoint_dir is not None and (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
            _save(checkpoint_dir, model, names, optimizer, scheduler, step + 1, losses)
    model.eval()
    if checkpoint_dir is not None:
        (checkpoint_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    tokens = params.steps * params.batch_size * params.grad_accum * blocks.shape[1]
    return TrainResult(params.steps, start, losses, tokens, discarded)


def _save(folder: Path, model, names, optimizer, scheduler, step: int, losses: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(model.named_parameters())
    payload = {
        "step": step,
        "losses": losses,
        "weights": {name: state[name].detach().cpu() for name in names},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    tmp = folder / f"{CHECKPOINT_NAME}.tmp-{os.getpid()}"  # two runs of one job never share a half-written file
    torch.save(payload, tmp)
    os.replace(tmp, folder / CHECKPOINT_NAME)


def _resume(folder: Path | None, model, names, optimizer, scheduler) -> tuple[int, list[float], bool]:
    """``(step, losses, discarded)`` from a checkpoint in ``folder``; one for other parameters is discarded."""
    path = None if folder is None else folder / CHECKPOINT_NAME
    if path is None or not path.is_file():
        return 0, [], False
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if sorted(payload["weights"]) != sorted(names):
        return 0, [], True
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            state[name].copy_(payload["weights"][name])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    return int(payload["step"]), list(payload["losses"]), False
