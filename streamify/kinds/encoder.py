"""Encoders (BERT-like): token windows in, hidden states out; judged by how close embeddings stay to a reference."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamify.kinds import in_mapping
from streamify.kinds.causal_lm import TextKind


class Encoder(TextKind):
    name = "encoder"
    summary = "encoder: token ids -> hidden states; mean-pooled embeddings, cosine similarity to the source"
    compares_to_source = True
    order = 50

    def matches(self, model: Any) -> bool:
        from transformers import PreTrainedModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING

        if not isinstance(model, PreTrainedModel) or getattr(model.config, "is_encoder_decoder", False):
            return False
        bare = in_mapping(MODEL_MAPPING, model) or in_mapping(MODEL_FOR_MASKED_LM_MAPPING, model)
        return bare and not getattr(model.config, "is_decoder", False)

    @torch.inference_mode()
    def score(self, checkpoint: Any, data: Any, spec: Any, progress: Any) -> tuple[dict, Any]:
        embeddings = torch.cat(
            [embed(checkpoint.model, batch) for batch in progress.track(data.split(spec.batch_size), "embedding")]
        )
        return {"embeddings": int(embeddings.shape[0]), "embedding_dim": int(embeddings.shape[1])}, embeddings

    def compare(self, outputs: Any, reference: Any) -> dict:
        cosine = F.cosine_similarity(outputs.double(), reference.double(), dim=-1)
        return {"cosine_to_reference_mean": cosine.mean().item(), "cosine_to_reference_min": cosine.min().item()}


def embed(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Mean-pooled last hidden states of ``ids`` ``[n, seq_len]`` -> ``[n, hidden]`` (fp32, on the CPU)."""
    device = next(model.parameters()).device
    base = model.base_model
    hidden = base(input_ids=ids.to(device)).last_hidden_state
    return hidden.float().mean(dim=1).cpu()


KINDS = (Encoder(),)
