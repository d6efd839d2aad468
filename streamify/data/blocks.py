"""Tokenize texts into fixed-length blocks of token ids."""

from __future__ import annotations

import random

import torch

from streamify.errors import UsageError

_CHARS_PER_TOKEN_BOUND = 16  # never feed the tokenizer much more text than the blocks can hold


def token_blocks(
    tokenizer,
    texts: list[str],
    seq_len: int,
    max_tokens: int | None = None,
    seed: int | None = None,
    where: str = "data",
) -> torch.Tensor:
    """Concatenate ``texts`` (EOS between them), cut into non-overlapping ``[n, seq_len]`` blocks.

    ``max_tokens`` caps the total (rounded down to whole blocks). With ``seed``
    the texts are shuffled first (seeded sampling); without it they keep their order.
    """
    if tokenizer is None:
        raise UsageError(f"{where}: the model has no tokenizer", "use a checkpoint that ships tokenizer files")
    if seq_len < 2:
        raise UsageError(f"seq_len {seq_len} is too short", "use a sequence length of at least 2")
    order = list(texts)
    if seed is not None:
        random.Random(seed).shuffle(order)
    wanted = (max_tokens // seq_len) * seq_len if max_tokens else None
    if wanted == 0:
        raise UsageError(f"max_tokens {max_tokens} is less than one block of {seq_len}", "raise max_tokens")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in order:
        if wanted is not None and len(ids) >= wanted:
            break
        if wanted is not None:
            text = text[: (wanted - len(ids)) * _CHARS_PER_TOKEN_BOUND]
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
    count = len(ids) // seq_len if wanted is None else min(len(ids), wanted) // seq_len
    if count == 0:
        raise UsageError(
            f"{where}: holds only {len(ids)} tokens, fewer than one block of {seq_len}",
            "use more text or a shorter seq_len",
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
