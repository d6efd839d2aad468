"""LoRA adapters (peft) for training stages: wrap, train, merge back into plain weights."""

from __future__ import annotations

from torch import nn


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
