"""Causal LoRA for text encoders (BERT-like), the text half of ``convert.causal``.

The encoder's self-attention gets the chunk-causal mask of
:mod:`streamify.runtime.chunk_causal` (chunks of ``chunk_tokens`` tokens), so a
token's state depends only on its chunk and the ones before: a prefix of a
document embeds the same whatever follows it. LoRA adapters on the attention
projections learn to keep each token's last hidden state close to the
bidirectional original's (1 − cosine similarity per token, averaged). The
original's states are computed once before training, so no teacher copy is
kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from streamify.data.blocks import token_blocks
from streamify.data.sources import load_texts
from streamify.distill.lora import add_lora, train_and_merge
from streamify.io.checkpoint import Checkpoint
from streamify.pipeline.registry import StageContext
from streamify.runtime.chunk_causal import ChunkSpec, enable_chunk_causal

if TYPE_CHECKING:
    from streamify.converters.causal_params import CausalParams


def _states(model, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states (``model.base_model``: the bare encoder of a masked-LM checkpoint too;
    peft's adapters sit inside it, so this runs them)."""
    return model.base_model(input_ids=ids).last_hidden_state


def train_text_encoder(
    checkpoint: Checkpoint, params: CausalParams, spec: ChunkSpec, projections: tuple[str, ...], ctx: StageContext
):
    """LoRA (or all weights) trained under the mask to keep the bidirectional model's token states; returns the
    merged model and the training metrics."""
    model = checkpoint.model
    device = next(model.parameters()).device
    wanted = params.steps * params.batch_size * params.grad_accum * params.seq_len
    blocks = token_blocks(
        checkpoint.tokenizer, load_texts(ctx.data, "train"), params.seq_len, wanted, ctx.seed, f"--data {ctx.data}"
    ).to(device)
    with torch.no_grad():  # kept on the CPU: tokens x hidden floats
        teacher = torch.cat([_states(model, batch).cpu() for batch in blocks.split(max(1, params.batch_size))])
    trainee = add_lora(model, params.lora_rank, params.lora_alpha, list(projections))
    enable_chunk_causal(model, spec)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        rows = batch[:, 0]
        student = _states(model, blocks[rows])
        target = teacher[rows.cpu()].to(device)
        return (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).mean()

    rows = torch.arange(blocks.shape[0], device=device)[:, None]
    merged, metrics = train_and_merge(model, trainee, rows, loss_fn, params, ctx)
    return merged, {**metrics, "train_blocks": blocks.shape[0], "train_tokens": blocks.numel()}
