"""Stage ``distill.hybrid``: a Llama-family decoder becomes a Mamba2/attention hybrid (MambaInLlama), then distils.

1. Rewrite (:mod:`streamify.distill.hybrid_model`): the chosen layers' attention
   becomes a Mamba2 mixer (copied from the attention, or random); everything
   else keeps the source's weights exactly, in GraniteMoeHybrid or Bamba.
2. Stage 1, alignment (``align_tokens``): each mixer learns the attention it
   replaces, its output given the teacher's input to that attention (relative
   MSE); only mixer parameters train.
3. Stage 2, distillation (``tokens``): the whole hybrid learns the teacher's
   next-token distribution (KL on logits), all weights or LoRA, through the
   same loop as healing.

Held-out KL to the teacher is measured after the rewrite and after each stage.
With ``window`` the kept attention layers become sinks + window (stage 2
trains under it), so the hybrid streams in bounded memory.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from streamify.arch import supported
from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.distill.heal import HealParams, heal
from streamify.distill.hybrid_model import attention_bias, check_source, hybrid_parameters, to_hybrid
from streamify.distill.losses import heldout_kl, kl_to_teacher
from streamify.distill.trainer import TrainParams, result_params, train
from streamify.errors import UsageError
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.model.blocks import block_list, layer_count
from streamify.model.fingerprint import content_key
from streamify.model.hooks import capturing, muting
from streamify.model.params import count_params
from streamify.pipeline.registry import StageContext, register
from streamify.progress import Progress
from streamify.runtime.attention import enable_streaming
from streamify.runtime.spec import CONFIG_KEY, make_spec, parse_full_layers, read_spec

KL_GUIDED = "kl-guided:"
MIXER_OUT = "re:.*\\.mamba\\.out_proj$"
FLAG = "--mamba-layers"


class HybridParams(BaseModel):
    """Params of ``distill.hybrid``."""

    model_config = ConfigDict(extra="forbid")

    mamba_layers: str | list[int] = Field(
        "every:2",
        description="layers whose attention becomes a Mamba2 mixer: every:K (layers K-1, 2K-1, ...), a list "
        "(3,7), middle-third, none, or kl-guided:N (the N layers whose attention costs least to drop, measured "
        "as KL on calibration text)",
    )
    init: Literal["copy", "random"] = Field(
        "copy", description="copy: mixer x/B/C/out from the attention's V/K/Q/O (MambaInLlama); random: fresh"
    )
    target: Literal["granitemoehybrid", "bamba"] = Field(
        "granitemoehybrid",
        description="the transformers hybrid architecture written (vLLM registers both; Bamba needs transformers 5+)",
    )
    align_tokens: int = Field(65536, ge=0, description="stage 1 (per-layer alignment) tokens; 0 skips it")
    tokens: int = Field(262144, ge=0, description="stage 2 (end-to-end KL) tokens; 0 skips it")
    seq_len: int = Field(256, ge=2, description="training and held-out sequence length")
    align_lr: float = Field(1e-3, gt=0, description="stage 1 peak learning rate (mixer parameters only)")
    lr: float = Field(1e-4, gt=0, description="stage 2 peak learning rate")
    batch_size: int = Field(1, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps of each stage")
    lora_rank: int = Field(0, ge=0, description="stage 2 LoRA rank (0: all weights train)")
    lora_alpha: int = Field(32, ge=1, description="stage 2 LoRA alpha")
    autocast: Literal["off", "bf16"] = Field("off", description="bf16: forward passes under bf16 autocast")
    gradient_checkpointing: bool = Field(False, description="recompute activations in stage 2's backward pass")
    checkpoint_every: int = Field(25, ge=1, description="save a resumable checkpoint every N steps")
    calib_tokens: int = Field(4096, ge=1, description="kl-guided: calibration tokens for the per-layer cost")
    eval_blocks: int = Field(4, ge=1, description="held-out sequences for the KL measured after each stage")
    window: int | None = Field(
        None, ge=1, description="kept attention layers become sinks + window of this many tokens (None: full)"
    )
    sinks: int = Field(4, ge=0, description="attention-sink tokens when window is set")


def _steps(tokens: int, params: HybridParams) -> int:
    return math.ceil(tokens / (params.batch_size * params.grad_accum * params.seq_len)) if tokens else 0


def _train_params(params: HybridParams, tokens: int, lr: float) -> dict:
    return {
        "steps": _steps(tokens, params),
        "lr": lr,
        "batch_size": params.batch_size,
        "grad_accum": params.grad_accum,
        "warmup_steps": params.warmup_steps,
        "checkpoint_every": params.checkpoint_every,
        "autocast": params.autocast,
    }


def distill_params(params: HybridParams, has_mamba: bool = True) -> HealParams:
    """Stage 2's settings as the healing loop takes them. LoRA leaves the mixers' ``out_proj`` alone: with
    the mamba-ssm kernels (GPUs) transformers hands its base weight to a fused kernel, which an adapter
    would never see."""
    return HealParams(
        **_train_params(params, params.tokens, params.lr),
        lora_rank=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_ignore=[MIXER_OUT] if params.lora_rank and has_mamba else [],
        gradient_checkpointing=params.gradient_checkpointing,
        eval_blocks=params.eval_blocks,
    )


def layer_choice(params: HybridParams, count: int) -> list[int] | int:
    """The replaced layers when ``mamba_layers`` names them, or how many ``kl-guided:N`` picks; checks that
    attention is left."""
    spec = params.mamba_layers
    if isinstance(spec, str) and spec.strip().lower().startswith(KL_GUIDED):
        amount = spec.strip()[len(KL_GUIDED) :]
        if not amount.isdigit() or not 1 <= int(amount) < count:
            raise UsageError(
                f"{FLAG} {spec}: N must be a whole number from 1 to {count - 1} (the model has {count} layers)",
                "use kl-guided:N, e.g. kl-guided:8",
            )
        return int(amount)
    layers = parse_full_layers(spec, count, FLAG)
    _keeps_attention(layers, count)
    return layers


def _keeps_attention(layers: list[int], count: int) -> None:
    if len(layers) >= count:
        raise UsageError(
            f"{FLAG}: replacing all {count} layers leaves no attention; a hybrid keeps at least one attention "
            "layer (its exact recall over the window is what the Mamba layers lack)",
            "replace fewer layers, e.g. every:2 or every:4",
        )


def _plan_check(params: HybridParams, model, where: str) -> dict:
    """The source, the layer choice and the window against the model's config, before any weight is read."""
    check_source(model.config, where)
    count = layer_count(model.config)
    layers = layer_choice(params, count)
    if params.window is not None:
        make_spec(params.sinks, params.window, "none", count)
    return {"mamba_layers": layers if isinstance(layers, list) else params.mamba_layers}


def _check_trainable_dtype(teacher, params: HybridParams, where: str) -> None:
    """Refuse half-precision weights before anything runs when a stage trains them whole (the loop trains fp32)."""
    dtype = next(teacher.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16) and (params.align_tokens or (params.tokens and not params.lora_rank)):
        raise UsageError(
            f"{where}: the model is loaded in {str(dtype).removeprefix('torch.')}, and distill.hybrid trains the "
            "new Mamba mixers (and in stage 2 every weight) in fp32",
            "load it in fp32 (--dtype fp32; add --autocast bf16 for bf16 speed), then convert dtype after",
        )


def _bytes_per_param(params: HybridParams, before: float, model) -> float:
    """Stored bytes per source parameter once the chosen attention layers are Mamba2 mixers (larger)."""
    count = layer_count(model.config)
    layers = layer_choice(params, count)
    amount = len(layers) if isinstance(layers, list) else layers
    mamba = [i < amount for i in range(count)]  # every layer is the same size: which ones does not matter
    bias = attention_bias(model, "model")
    return before * hybrid_parameters(model.config, mamba, params.target, bias) / count_params(model)


def kl_guided_layers(teacher, ids: torch.Tensor, amount: int, progress: Progress) -> tuple[list[int], dict]:
    """The ``amount`` layers whose attention costs least: KL(teacher || teacher without that layer's attention)
    on ``ids``, one layer at a time; returns the layers and every layer's cost."""
    _, blocks = block_list(teacher, "teacher")
    device = next(teacher.parameters()).device
    costs = {}
    with torch.no_grad():
        reference = [teacher(block[None].to(device)).logits for block in ids]
        for index in progress.track(range(len(blocks)), "kl-guided: layer costs"):
            with muting(blocks[index].self_attn):
                cost = sum(
                    kl_to_teacher(teacher(block[None].to(device)).logits, target).item()
                    for block, target in zip(ids, reference, strict=True)
                )
            costs[index] = round(cost / len(ids), 6)
    return sorted(sorted(costs, key=costs.get)[:amount]), costs


def align(student, teacher, layers: list[int], blocks: torch.Tensor, settings: TrainParams, **train_kwargs) -> dict:
    """Stage 1: every new mixer learns its attention's output from the teacher's input to it (relative MSE,
    averaged over the layers); only the mixers train. Returns the loop's result."""
    _, teacher_blocks = block_list(teacher, "teacher")
    _, student_blocks = block_list(student, "student")
    attentions = [teacher_blocks[i].self_attn for i in layers]
    mixers = [student_blocks[i].mamba for i in layers]
    for param in student.parameters():
        param.requires_grad_(False)
    for mixer in mixers:
        for param in mixer.parameters():
            param.requires_grad_(True)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        with torch.no_grad(), capturing(attentions, inputs, outputs):
            teacher(batch)
        losses = [
            (mixer(hidden_states=x).float() - y.float()).pow(2).mean() / y.float().pow(2).mean().clamp_min(1e-12)
            for mixer, x, y in zip(mixers, inputs, outputs, strict=True)
        ]
        return torch.stack(losses).mean()

    result = train(student, blocks, loss_fn, settings, **train_kwargs)
    for param in student.parameters():
        param.requires_grad_(True)
    return result


def _kl(student, teacher, ids: torch.Tensor) -> float:
    device = next(student.parameters()).device
    with torch.no_grad():
        return round(heldout_kl(lambda x: student(x).logits, lambda x: teacher(x).logits, ids, device), 6)


@register(
    "distill.hybrid",
    HybridParams,
    "replace attention layers by Mamba2 mixers (GraniteMoeHybrid / Bamba), align them, distil end to end",
    relation="finetune",
    # the plan checks stage 2's settings against the source, which has no mixers yet
    training=lambda p: (distill_params(p, has_mamba=False), p.seq_len, True) if p.tokens else None,
    trains=lambda p: p.align_tokens > 0,
    check=_plan_check,
    bytes_per_param=_bytes_per_param,
    applies=lambda model: (
        None
        if model.config.model_type in supported("hybrid_source")
        else f"hybrid distillation rewrites Llama-family decoders ({', '.join(supported('hybrid_source'))}), "
        f"not '{model.config.model_type}'"
    ),
    reshapes=True,
)
def distill_hybrid(checkpoint: Checkpoint, params: HybridParams, ctx: StageContext) -> Checkpoint:
    """Rewrite ``checkpoint``'s model as a hybrid per ``params``, align and distil it; the source is the teacher."""
    teacher = checkpoint.model
    where = checkpoint.source.spec
    if read_spec(teacher.config) is not None:
        raise UsageError(
            f"{where}: the input already streams (sinks + window); the hybrid learns from full attention",
            "give the model before convert streaming, and set window/sinks on distill.hybrid instead",
        )
    _check_trainable_dtype(teacher, params, where)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    count = layer_count(teacher.config)
    tokenizer, data = checkpoint.tokenizer, ctx.data
    eval_ids = token_blocks(tokenizer, load_texts(data, "heldout"), params.seq_len, params.eval_blocks * params.seq_len)
    layers = layer_choice(params, count)
    costs: dict = {}
    if not isinstance(layers, list):  # kl-guided: how many
        calib = token_blocks(tokenizer, load_texts(data, "train"), params.seq_len, params.calib_tokens, seed=ctx.seed)
        layers, costs = kl_guided_layers(teacher, calib, layers, ctx.progress)
    ctx.progress.log(f"layers {', '.join(map(str, layers)) or 'none'} of {count} become Mamba2 ({params.init} init)")
    torch.manual_seed(ctx.seed)
    student = to_hybrid(teacher, [i in layers for i in range(count)], params.init, params.target, where)
    student.to(next(teacher.parameters()).device)
    metrics: dict = {"mamba_layers": layers, "attention_layers": [i for i in range(count) if i not in layers]}
    metrics["heldout_kl_rewrite"] = _kl(student, teacher, eval_ids)
    if params.align_tokens and layers:
        settings = TrainParams(**_train_params(params, params.align_tokens, params.align_lr))
        blocks = token_blocks(tokenizer, load_texts(data, "train"), params.seq_len, params.align_tokens, seed=ctx.seed)
        _, teacher_blocks = block_list(teacher, where)
        targets = content_key(torch.nn.ModuleList(teacher_blocks[i].self_attn for i in layers), {})
        key = {
            "phase": "align",
            "params": result_params(settings),
            "seq_len": params.seq_len,
            "layers": layers,
            "attention": targets,  # what the mixers learn (a random init holds none of it)
            "data": data,
            "seed": ctx.seed,
        }
        folder = cache_root() / "train" / content_key(student, key) if ctx.use_cache else None
        ctx.progress.log(f"stage 1: aligning {len(layers)} mixers to their attention ({settings.steps} steps)")
        result = align(
            student, teacher, layers, blocks, settings, seed=ctx.seed, checkpoint_dir=folder, progress=ctx.progress
        )
        metrics.update(
            align_steps=result.steps,
            align_tokens=result.tokens,
            align_resumed_from_step=result.resumed_from,
            align_loss_first=result.losses[0] if result.losses else None,
            align_loss_last=result.losses[-1] if result.losses else None,
            heldout_kl_aligned=_kl(student, teacher, eval_ids),
        )
    spec = None
    if params.window is not None:
        spec = make_spec(params.sinks, params.window, "none", count, tuple(layers))
        enable_streaming(student, spec)
    if params.tokens:
        settings = distill_params(params, bool(layers))
        ctx.progress.log(f"stage 2: distilling end to end ({settings.steps} steps)")
        student, healed = heal(
            student,
            teacher,
            tokenizer,
            settings,
            seq_len=params.seq_len,
            data=data,
            seed=ctx.seed,
            resumable=ctx.use_cache,
            progress=ctx.progress,
        )
        metrics.update({key.replace("heal_", "distill_"): value for key, value in healed.items()})
    if spec is not None:
        enable_streaming(student, spec)
        setattr(student.config, CONFIG_KEY, spec.to_json())
        checkpoint.streaming = {**spec.to_json(), "architecture": type(student).__name__}
    metrics["parameters_teacher"] = count_params(teacher)
    metrics["parameters_hybrid"] = count_params(student)
    metrics["costs"] = costs
    checkpoint.model = student
    ctx.metrics.update(target=params.target, init=params.init, **metrics)
    return checkpoint
