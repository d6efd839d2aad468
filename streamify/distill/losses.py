"""Distillation losses on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KL_CHUNK = 1024  # positions per piece of :func:`kl_to_teacher`


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at ``temperature`` (scaled by T² as in Hinton et al.).

    Computed over pieces of :data:`KL_CHUNK` positions, each recomputed in the
    backward pass (``torch.utils.checkpoint``): the log-softmaxes of only one
    piece exist at a time, not of the whole sequence (at 8k tokens and a 49k
    vocabulary each full copy is 1.6 GB).
    """
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    total = sum(
        checkpoint(_kl_sum, student[i : i + KL_CHUNK], teacher[i : i + KL_CHUNK], temperature, use_reentrant=False)
        for i in range(0, student.shape[0], KL_CHUNK)
    )
    return total / student.shape[0] * temperature**2


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def top_k_log_probs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probabilities, indices)`` of the ``k`` most likely tokens of each position at ``temperature``."""
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = log_probs.topk(min(k, logits.shape[-1]), dim=-1)
    return values, indices


def kl_to_top_k(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top k tokens plus one bin for the rest.

    ``top_values``/``top_indices`` come from :func:`top_k_log_probs` on the
    teacher. The KL of the k + 1 bins equals the full KL when the teacher puts
    no mass outside its top k and is a lower bound of it otherwise (scaled by
    T² as :func:`kl_to_teacher`).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = student.gather(-1, top_indices)
    teacher_rest = torch.log1p(-top_values.exp().sum(-1).clamp(max=1 - 1e-6))
    student_rest = torch.log1p(-picked.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (top_values.exp() * (top_values - picked)).sum(-1) + teacher_rest.exp() * (teacher_rest - student_rest)
    return kl.mean() * temperature**2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], block_map: list[int]) -> torch.Tensor:
    """Mean over student blocks of MSE(student output j, teacher output ``block_map[j]``) / teacher power."""
    terms = []
    for j, t in enumerate(block_map):
        target = teacher[t + 1].float()
        terms.append(F.mse_loss(student[j + 1].float(), target) / target.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


@torch.no_grad()
def heldout_kl(student, teacher, blocks: torch.Tensor, device: torch.device) -> float:
    """Mean per-token KL(teacher || student) over ``blocks``, one block at a time; ``student`` and ``teacher``
    map token ids ``[1, seq_len]`` to logits."""
    total = 0.0
    for block in blocks:
        ids = block[None].to(device)
        total += kl_to_teacher(student(ids), teacher(ids)).item()
    return total / len(blocks)
