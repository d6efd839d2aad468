"""Perplexity over non-overlapping windows of token ids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from streamify.progress import SILENT, Progress


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 1, progress: Progress = SILENT) -> dict:
    """Perplexity of a causal LM on ``[n, seq_len]`` blocks (each window scored on its own).

    Returns ``perplexity``, mean ``nll`` (nats per token) and ``tokens`` (the
    number of predicted tokens: ``n * (seq_len - 1)``).
    """
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    batches = blocks.split(batch_size)
    for batch in progress.track(batches, "perplexity", total=len(batches)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}
