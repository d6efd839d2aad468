"""The project's one training loop, on accelerate: seeded, data-parallel, gradient accumulation, checkpoint/resume.

Every training stage (healing after streaming conversion or depth pruning,
causal LoRA, and later distillation stages) calls :func:`train` with a loss
function of one batch; the loop owns the optimizer, the schedule, the batches'
order and the checkpoints. It runs through an ``accelerate.Accelerator``: one
process as a plain loop, several (``accelerate launch`` or ``torchrun``) as
DDP, each process taking its share of every step's micro-batches, so the
global batch, the batch order and the result do not depend on the number of
processes. A killed run resumes where it stopped, with any number of
processes, and ends with the same weights as an uninterrupted one (the batch
of step ``i`` depends only on the seed and ``i``).

Distribution-matching distillation trains a second network beside the model
(a critic, :class:`Companion`) with its own optimizer, several updates of it
per update of the model, and keeps an exponential moving average of the
model's weights (``ema_decay``); both are part of the checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file
from torch import nn

from streamify.errors import UsageError
from streamify.progress import SILENT, Progress

STATE_NAME = "streamify_train.json"  # written last into a checkpoint folder: the folder is complete
COMPANION = "companion"  # the prefix of a companion's parameters in checkpoints


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
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing): far less memory at long sequences, for about a third more time",
    )
    autocast: Literal["off", "bf16"] = Field(
        "off",
        description="bf16: forward passes under torch.autocast in bf16 (weights, gradients and optimizer stay "
        "fp32); faster on GPUs and on CPUs with bf16 units, at slightly noisier gradients",
    )


@dataclass
class Companion:
    """A second network trained beside the model (DMD's critic): its parameters that require grad, its loss of
    one micro-batch, its own AdamW at a constant ``lr`` and ``updates`` steps of it before each step of the
    model, on the same micro-batches."""

    module: nn.Module
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    lr: float
    updates: int = 1


class Ema:
    """An exponential moving average of trainable weights (fp32), saved with the checkpoints."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.weights = {name: p.detach().float().clone() for name, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        for name, p in named.items():
            self.weights[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        with torch.no_grad():
            for name, weight in state["weights"].items():  # accelerate loads onto the CPU: keep the devices
                self.weights[name].copy_(weight)


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    resumed_from: int
    losses: list[float]
    tokens: int
    discarded_checkpoint: bool = False  # a checkpoint for other parameters was found and not used
    companion_losses: list[float] = field(default_factory=list)  # the mean loss of each step's companion updates
    ema: dict[str, torch.Tensor] | None = None  # the averaged weights, by parameter name


def check_share(grad_accum: int, processes: int, where: str) -> None:
    """Refuse a ``grad_accum`` that ``processes`` cannot share equally (each takes every n-th micro-batch)."""
    if grad_accum % processes:
        raise UsageError(
            f"{where}: training on {processes} processes needs grad_accum (now {grad_accum}) to be a multiple of "
            f"{processes}, so that every process takes the same share of a step's micro-batches",
            f"set grad_accum (--heal-grad-accum, --grad-accum) to a multiple of {processes}",
        )


def result_params(params: TrainParams) -> dict:
    """The params that decide a training's result (part of its checkpoint's key): all but how memory and
    checkpoints are handled, so turning gradient checkpointing on still resumes a run."""
    return params.model_dump(exclude={"gradient_checkpointing", "checkpoint_every"})


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


class _Objective(nn.Module):
    """The model and its loss as one module, so that DDP's forward runs the loss (the teacher calls included)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(batch)


def train(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: TrainParams,
    *,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: Progress = SILENT,
    companion: Companion | None = None,
    ema_decay: float | None = None,
) -> TrainResult:
    """Train ``model``'s parameters that require grad on ``blocks`` (token ids ``[n, seq_len]``, or any rows the
    loss reads, such as indices of training examples).

    ``loss_fn(batch)`` returns the scalar loss of one micro-batch (rows on the
    model's device). Under several processes, process ``r`` of ``n`` runs the
    micro-batches ``r, r + n, ...`` of each step (``grad_accum`` must be a
    multiple of ``n``) and DDP sums their gradients. With ``checkpoint_dir``,
    the trainable weights (the companion's too), optimizers, schedule, moving
    average and random states are saved (``Accelerator.save_state``) every
    ``checkpoint_every`` steps and a later call with the same directory
    resumes from them; the directory is removed at the end. Only the main
    process logs. Random draws inside ``loss_fn`` (noise, levels) come from
    torch's generator, seeded per process, so they depend on the number of
    processes (the batches do not).
    """
    device = next(model.parameters()).device
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    extra = {} if companion is None else {n: p for n, p in companion.module.named_parameters() if p.requires_grad}
    _refuse_half_weights([*named.values(), *extra.values()])
    accelerator = _accelerator(params, device)
    world = accelerator.num_processes
    check_share(params.grad_accum, world, "training")
    if world > 1:  # the random draws inside the losses (noise, levels) differ from process to process
        torch.manual_seed((torch.initial_seed() + accelerator.process_index) % 2**63)
    if not accelerator.is_main_process:
        progress = SILENT
    optimizer = torch.optim.AdamW(named.values(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, params))
    objective = accelerator.prepare_model(_Objective(model, loss_fn), device_placement=False)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    scheduler = accelerator.prepare_scheduler(scheduler)
    if companion is not None:
        second = _Objective(companion.module, companion.loss_fn)
        second = accelerator.prepare_model(second, device_placement=False)
        second_optimizer = torch.optim.AdamW(extra.values(), lr=companion.lr, weight_decay=params.weight_decay)
        second_optimizer = accelerator.prepare_optimizer(second_optimizer, device_placement=False)
    ema = Ema(named, ema_decay) if ema_decay is not None else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    tensors = {**named, **{f"{COMPANION}.{n}": p for n, p in extra.items()}}
    checkpoints = _Checkpoints(checkpoint_dir, accelerator, tensors)
    start, losses, second_losses, discarded = checkpoints.resume()
    if discarded:
        progress.log(
            f"training: the checkpoint in {checkpoint_dir} holds other parameters than this model trains, "
            "so it is not resumed: training starts at step 0"
        )
    if start:
        progress.log(f"training: resumed at step {start}/{params.steps} from {checkpoint_dir}")
    mine = list(range(accelerator.process_index, params.grad_accum, world))

    def step_of(target, step_optimizer, trainable, step: int, lr: float) -> float:
        """One optimizer step of ``target`` over this process's micro-batches of ``step``; the global loss.
        A non-finite loss stops the training before the step (:func:`_refuse_non_finite`)."""
        step_optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in mine:
            batch = blocks[batch_indices(step, micro, params, blocks.shape[0], seed)].to(device)
            with accelerator.no_sync(target) if micro != mine[-1] else nullcontext():
                loss = target(batch) / params.grad_accum
                (loss * world).backward()  # DDP averages over the processes: the sum is wanted
            step_loss += loss.detach().float()
        total = accelerator.reduce(step_loss, "sum").item()
        _refuse_non_finite(total, step, lr)
        accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
        step_optimizer.step()
        return total

    weights, others = list(named.values()), list(extra.values())
    if params.gradient_checkpointing:
        _checkpoint_activations(model, True)
    model.train()
    try:
        for step in progress.track(range(start, params.steps), "training", total=params.steps - start):
            if companion is not None:
                updates = [
                    step_of(second, second_optimizer, others, step, companion.lr) for _ in range(companion.updates)
                ]
                second_losses.append(round(sum(updates) / len(updates), 6))
            losses.append(round(step_of(objective, optimizer, weights, step, params.lr), 6))
            scheduler.step()
            if ema is not None:
                ema.update(named)
            if (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
                checkpoints.save(step + 1, losses, second_losses)
    finally:
        model.eval()
        if params.gradient_checkpointing:
            _checkpoint_activations(model, False)
    checkpoints.clear()
    accelerator.free_memory()  # the optimizer's state and DDP's buffers go now, not at a later collection
    tokens = params.steps * params.batch_size * params.grad_accum * blocks.shape[1]
    return TrainResult(
        params.steps, start, losses, tokens, discarded, second_losses, ema.weights if ema is not None else None
    )


def _refuse_non_finite(loss: float, step: int, lr: float) -> None:
    """UsageError when a step's loss is NaN or infinite: its gradients would turn every weight NaN, and the
    model would be published as trained."""
    if not math.isfinite(loss):
        raise UsageError(
            f"training diverged: the loss of step {step + 1} is {loss}; the run stops before that step changes "
            "the weights, and nothing is published",
            f"lower the learning rate (it is {lr:g} here) or look for NaN or infinite values in the data",
        )


def _checkpoint_activations(model: nn.Module, on: bool) -> None:
    """Turn transformers' gradient checkpointing on (non-reentrant: frozen inputs are fine) or off."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise UsageError(
            f"gradient_checkpointing: {type(model).__name__} is not a transformers model that offers it",
            "set gradient_checkpointing to false",
        )
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _refuse_half_weights(trainable: list[torch.Tensor]) -> None:
    """Refuse to train bf16/fp16 weights in place (no fp32 master copy)."""
    half_types = (torch.bfloat16, torch.float16)
    half = sorted({str(p.dtype).removeprefix("torch.") for p in trainable if p.dtype in half_types})
    if half:
        raise UsageError(
            f"training would update {', '.join(half)} weights in place, and AdamW steps smaller than their "
            "precision would be lost (no fp32 master weights)",
            "load the model in fp32 (--dtype fp32) and train with --heal-autocast bf16 (recipe: autocast) for "
            "bf16 speed, or train LoRA adapters (lora_rank > 0), which stay fp32",
        )


def _accelerator(params: TrainParams, device: torch.device):
    """An ``Accelerator`` at this run's mixed precision, on the process group that ``accelerate launch`` or
    ``torchrun`` set up (none: one process).

    accelerate keeps one state per process; a run whose stages train at different precisions (or a test
    session) resets the precision part of it, never the process group."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = "bf16" if params.autocast == "bf16" else "no"
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision, step_scheduler_with_optimizer=False)
    strategy = accelerator.distributed_type.value
    if strategy in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UsageError(
            f"the launcher asked for {strategy}; streamify's training runs as DDP (every process holds the whole "
            "model) and does not shard it yet",
            "launch without --use_fsdp/--use_deepspeed (accelerate launch --multi_gpu, or torchrun)",
        )
    return accelerator


class _Checkpoints:
    """Resumable training states in ``folder``: ``step-NNNNNN/``, each an ``Accelerator.save_state`` folder whose
    model file holds the trainable weights only, plus :data:`STATE_NAME` (step, losses, parameter names)."""

    def __init__(self, folder: Path | None, accelerator, tensors: dict[str, torch.Tensor]) -> None:
        self.folder, self.accelerator, self.tensors = folder, accelerator, tensors
        self.names = list(tensors)
        accelerator.register_save_state_pre_hook(self._keep_trainable)
        accelerator.register_load_state_pre_hook(self._load_trainable)

    def _keep_trainable(self, models, weights, output_dir) -> None:
        weights[:] = [{name: tensor.detach() for name, tensor in self.tensors.items()}]

    def _load_trainable(self, models, input_dir) -> None:
        models.clear()  # loaded here: the file holds the trainable weights only, under the model's own names
        stored = load_file(Path(input_dir) / "model.safetensors")
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor.copy_(stored[name])

    def resume(self) -> tuple[int, list[float], list[float], bool]:
        """``(step, losses, companion losses, discarded)`` from the newest complete state; one for other parameters
        is discarded.

        The main process decides, from its folder, and every process follows (on several machines the
        folder must be shared); a process that cannot read the state the main one chose fails loudly.
        """
        from accelerate.utils import broadcast_object_list

        chosen = [self._newest() if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        folder, record = chosen[0] or (None, None)
        if record is None:
            return 0, [], [], False
        if sorted(record["names"]) != sorted(self.names):
            return 0, [], [], True
        self.accelerator.load_state(folder)
        return int(record["step"]), list(record["losses"]), list(record.get("companion_losses", [])), False

    def _newest(self) -> tuple[str, dict] | None:
        found = sorted(self.folder.glob(f"step-*/{STATE_NAME}")) if self.folder is not None else []
        return (str(found[-1].parent), json.loads(found[-1].read_text())) if found else None

    def save(self, step: int, losses: list[float], companion_losses: list[float]) -> None:
        """Save the state after ``step`` steps (every process takes part); older states go once it is complete."""
        if self.folder is None:
            return
        target = self.folder / f"step-{step:06d}"
        self.accelerator.save_state(str(target))
        self.accelerator.wait_for_everyone()  # every process's random states are in
        if self.accelerator.is_main_process:
            record = {
                "step": step,
                "losses": losses,
                "companion_losses": companion_losses,
                "names": self.names,
                "processes": self.accelerator.num_processes,
            }
            tmp = target / f"{STATE_NAME}.tmp"
            tmp.write_text(json.dumps(record))
            tmp.replace(target / STATE_NAME)
            for older in self.folder.glob("step-*"):
                if older != target:
                    shutil.rmtree(older, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def clear(self) -> None:
        """Remove the folder at the end of training (the main process, once every process is done)."""
        self.accelerator.wait_for_everyone()
        if self.folder is not None and self.accelerator.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)
