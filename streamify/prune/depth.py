"""Stage ``prune.depth``: score blocks, remove them, optionally re-initialise or replace, heal."""

from __future__ import annotations

import copy
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.distill.heal import HealParams, heal
from streamify.distill.trainer import TrainParams, train
from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.model.blocks import block_list, find_blocks
from streamify.model.hooks import recording
from streamify.model.params import count_params
from streamify.pipeline.registry import StageContext, register
from streamify.progress import Progress
from streamify.prune.blockwise import boundary_stats_block_by_block, write_kept_blocks
from streamify.prune.scores import select_blocks
from streamify.prune.surgery import average_into_neighbours, check_removal, remove_blocks
from streamify.runtime.spec import read_spec
from streamify.units import ShardSize, shard_bytes


class DepthParams(BaseModel):
    """Params of ``prune.depth`` (give exactly one of ``remove``, ``keep_ratio``, ``blocks``)."""

    model_config = ConfigDict(extra="forbid")

    remove: int | None = Field(None, ge=1, description="number of blocks to remove")
    keep_ratio: float | None = Field(None, gt=0, lt=1, description="fraction of blocks to keep")
    blocks: list[int] | None = Field(None, description="exact block ids to remove (no scoring), e.g. [12, 13]")
    metric: Literal["bi", "angular", "streamline", "loss"] = Field("angular", description="how blocks are scored")
    reinit: Literal["none", "average"] = Field(
        "none", description="average: kept blocks next to a removed span become the mean of themselves and it"
    )
    replace: bool = Field(False, description="replace the removed contiguous span with one trained block")
    replace_steps: int = Field(100, ge=1, description="training steps of the replacement block (hidden-state MSE)")
    replace_lr: float = Field(1e-4, gt=0, description="learning rate of the replacement block")
    samples: int = Field(8, ge=1, description="calibration sequences for scoring")
    seq_len: int = Field(512, ge=2, description="calibration sequence length")
    protect_ends: bool = Field(True, description="never remove the first or the last block")
    heal: HealParams = Field(default_factory=HealParams, description="healing against the unpruned model")
    blockwise: Literal["auto", "on", "off"] = Field(
        "auto",
        description="score, remove and write one block at a time from the safetensors files (for models larger "
        "than memory; bi, angular or streamline scores or given blocks, no reinit, replacement, healing or "
        "eval); auto: when the in-memory run would not fit in the memory available",
    )
    max_shard_size: ShardSize = Field(
        "5GB", description="block by block: the artifact's safetensors shards are at most this size (e.g. 5GB)"
    )

    @field_validator("blocks", mode="before")
    @classmethod
    def _parse_blocks(cls, value):
        if isinstance(value, str):
            try:
                return [int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"'{value}' is not a comma-separated list of block ids, e.g. 12,13,14") from None
        return value

    def blockwise_obstacle(self) -> str | None:
        """What in these params rules out a block-wise run, or None."""
        needs_model = {
            "the loss metric runs the whole model for every candidate": self.metric == "loss" and self.blocks is None,
            "reinit average merges several blocks at once": self.reinit != "none",
            "a replacement block trains on the whole model": self.replace,
            "healing trains the whole model": self.heal.steps > 0,
        }
        found = [why for why, applies in needs_model.items() if applies]
        return "; ".join(found) or None

    @model_validator(mode="after")
    def _one_amount(self) -> DepthParams:
        given = [k for k in ("remove", "keep_ratio", "blocks") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of remove, keep_ratio, blocks (got {', '.join(given) or 'none'})")
        if self.blockwise == "on" and self.blockwise_obstacle():
            raise ValueError(f"blockwise on: {self.blockwise_obstacle()}; use blockwise off or auto")
        return self


def _amount(params: DepthParams, count: int) -> int:
    """Blocks to remove (``remove``, or what ``keep_ratio`` leaves out); UsageError when that is none."""
    if params.remove is not None:
        return params.remove
    amount = count - max(1, round(params.keep_ratio * count))
    if amount < 1:
        raise UsageError(
            f"keep_ratio {params.keep_ratio} of {count} blocks keeps all of them: nothing would be removed",
            f"use a keep_ratio below {(count - 0.5) / count:.3f}, or remove: N",
        )
    return amount


def _scoring_bytes(params: DepthParams, model) -> int:
    """Block by block: the calibration states in memory (entering and leaving the block that runs, one read
    back from disk, one more while a block's outputs are made) in fp32."""
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", 0)
    return 4 * params.samples * params.seq_len * hidden * 4


def _bytes_per_param(params: DepthParams, before: float, model) -> float:
    """The stored bytes per (source) parameter once the chosen number of blocks (the replacement kept) is gone."""
    _, blocks = block_list(model, "prune.depth")
    removed = len(set(params.blocks)) if params.blocks is not None else _amount(params, len(blocks))
    removed -= 1 if params.replace else 0
    per_block = sum(p.numel() for p in blocks[0].parameters())
    total = count_params(model)
    return before * (total - removed * per_block) / total


@register(
    "prune.depth",
    DepthParams,
    "remove whole blocks chosen by a metric (ShortGPT BI, angular, LLM-Streamline, loss), then heal",
    relation="finetune",
    training=lambda p: (p.heal, 512, True) if p.heal.steps else None,
    bytes_per_param=_bytes_per_param,
    applies=lambda model: None if find_blocks(model) else "no list of repeated blocks",
    reshapes=True,
    blockwise=lambda params, model: (params.blockwise, params.blockwise_obstacle(), _scoring_bytes(params, model)),
)
def prune_depth(checkpoint: Checkpoint, params: DepthParams, ctx: StageContext) -> Checkpoint:
    """Choose blocks, cut them out (the artifact is a stock checkpoint with fewer blocks), heal if asked."""
    model = checkpoint.model
    where = checkpoint.source.spec
    _, blocks = block_list(model, where)
    count = len(blocks)
    teacher = copy.deepcopy(model) if params.heal.steps or params.replace else None
    ids = token_blocks(
        checkpoint.tokenizer,
        load_texts(ctx.data, "train"),
        params.seq_len,
        params.samples * params.seq_len,
        seed=ctx.seed,
        where=f"--data {ctx.data}",
    )
    executor = checkpoint.blocks  # larger than memory: scored, cut and written one block at a time
    remove, table = _chosen(model, ids, params, count, where, ctx.progress, executor)
    if executor is not None:
        write_kept_blocks(checkpoint, remove, shard_bytes(params.max_shard_size), ctx.progress)
        ctx.metrics["path"] = "block-wise"
        reinitialised: list[int] = []
    else:
        reinitialised = average_into_neighbours(model, remove) if params.reinit == "average" else []
        dropped = remove[1:] if params.replace else remove
        block_map = [remove[-1] if params.replace and i == remove[0] else i for i in range(count) if i not in dropped]
        if params.replace:
            replace_span(model, teacher, remove, ids, params, ctx.seed, ctx.progress)
        else:
            remove_blocks(model, remove, where)
        if params.heal.steps:
            model, healed = heal(
                model,
                teacher,
                checkpoint.tokenizer,
                params.heal,
                seq_len=512,
                data=ctx.data,
                seed=ctx.seed,
                block_map=block_map,
                resumable=ctx.use_cache,
                progress=ctx.progress,
            )
            ctx.metrics.update(healed)
    checkpoint.model = model
    spec = read_spec(model.config)
    if checkpoint.streaming and spec is not None:  # the manifest's record follows the sliced spec
        checkpoint.streaming = {**checkpoint.streaming, **spec.to_json()}
    ctx.metrics.update(
        removed=remove,
        blocks_before=count,
        blocks_after=len(block_list(model, where)[1]),
        reinitialised=reinitialised,
        replaced=params.replace,
        scores=table,
    )
    return checkpoint


def _chosen(model, ids, params: DepthParams, count: int, where: str, progress: Progress, executor=None):
    """The blocks to remove (as given, or scored by the metric: block by block through ``executor`` when the
    model's blocks are on disk) and the score table."""
    if params.blocks is not None:
        remove, table = check_removal(params.blocks, count, where), {}
    else:
        stats = None if executor is None else partial(boundary_stats_block_by_block, executor, ids, progress=progress)
        amount = _amount(params, count)
        remove, table = select_blocks(model, ids, params.metric, amount, params.protect_ends, progress, stats)
    progress.log(f"removing blocks {', '.join(map(str, remove))} of {count}")
    return remove, table


def replace_span(model, teacher, span: list[int], ids, params: DepthParams, seed: int, progress: Progress) -> None:
    """LLM-Streamline: keep one block for the span, start it from the span's first, train it on hidden-state MSE."""
    if span != list(range(span[0], span[-1] + 1)):
        raise UsageError(
            f"--replace needs a contiguous span of blocks, got {', '.join(map(str, span))}",
            "use --metric angular or streamline (they pick spans), or give contiguous --blocks",
        )
    remove_blocks(model, span[1:])
    _, student_blocks = block_list(model, "model")
    _, teacher_blocks = block_list(teacher, "model")
    for param in model.parameters():
        param.requires_grad_(False)
    replacement = student_blocks[span[0]]
    for param in replacement.parameters():
        param.requires_grad_(True)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target: list[torch.Tensor] = []
            with recording(teacher_blocks[: span[-1] + 1], target):
                teacher(batch)
        produced: list[torch.Tensor] = []
        with _capture_output(replacement, produced):
            model(batch)
        return F.mse_loss(produced[0].float(), target[-1].float())

    settings = TrainParams(steps=params.replace_steps, lr=params.replace_lr, grad_accum=1, warmup_steps=5)
    train(model, ids, loss_fn, settings, seed=seed, progress=progress)
    for param in model.parameters():
        param.requires_grad_(False)


class _capture_output:
    """Context manager: append a module's output tensor (with grad) to a list."""

    def __init__(self, module: torch.nn.Module, sink: list):
        self.module, self.sink = module, sink

    def __enter__(self):
        def hook(module, args, output):
            self.sink.append(output[0] if isinstance(output, tuple) else output)

        self.handle = self.module.register_forward_hook(hook)
        return self.sink

    def __exit__(self, *exc) -> None:
        self.handle.remove()
