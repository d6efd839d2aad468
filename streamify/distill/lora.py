"""LoRA adapters (peft) for training stages: wrap, train, merge back into plain weights."""

from __future__ import annotations

import torch
from torch import nn

DROPOUT_ATTRIBUTES = ("dropout", "activation_dropout", "attention_dropout", "layerdrop")


def add_lora(model: nn.Module, rank: int, alpha: int, targets: list[str]) -> nn.Module:
    """``model`` wrapped with LoRA on the linear layers named ``targets``; rank 0 trains all weights."""
    if rank == 0:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with trained adapters merged into its weights (identity for full fine-tuning)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def train_and_merge(model: nn.Module, trainee: nn.Module, rows: torch.Tensor, loss_fn, params, ctx) -> tuple:
    """Train ``trainee`` (``model`` with adapters) on ``rows`` with :func:`~streamify.distill.trainer.train`,
    resumable from the cache when ``ctx.use_cache``; the merged model and the training metrics.

    The model's dropout is off while it trains (``nn.Dropout`` modules and the
    float ``dropout``/``activation_dropout``/``attention_dropout``/``layerdrop``
    attributes modules such as Whisper's read): the loss compares it with the
    original's deterministic outputs, which dropout noise would swamp."""
    from streamify.distill.trainer import result_params, train
    from streamify.io.cache import cache_root
    from streamify.model.fingerprint import content_key

    settings = {"params": result_params(params), "seed": ctx.seed, "data": ctx.data}
    checkpoint_dir = cache_root() / "train" / content_key(model, settings) if ctx.use_cache else None
    rates = [
        (module, name, getattr(module, name))
        for module in model.modules()
        for name in (("p",) if isinstance(module, nn.Dropout) else DROPOUT_ATTRIBUTES)
        if isinstance(getattr(module, name, None), float) and getattr(module, name)
    ]
    for module, name, _ in rates:
        setattr(module, name, 0.0)
    try:
        result = train(
            trainee, rows, loss_fn, params, seed=ctx.seed, checkpoint_dir=checkpoint_dir, progress=ctx.progress
        )
    finally:
        for module, name, rate in rates:
            setattr(module, name, rate)
    return merge_lora(trainee), {
        "train_steps": result.steps,
        "train_resumed_from_step": result.resumed_from,
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "train_losses": result.losses,
    }
