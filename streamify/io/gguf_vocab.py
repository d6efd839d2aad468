"""How a byte-level BPE tokenizer splits text, in llama.cpp's terms (``tokenizer.ggml.pre``) and back.

llama.cpp does not read a tokenizer's pre-tokenizer: a GGUF names it by the
``tokenizer.ggml.pre`` string and llama.cpp holds the matching split rules.
Exporting, the name is found from the HF tokenizer's own pre-tokenizer;
loading a GGUF, transformers rebuilds the HF pre-tokenizer from the name, and
the one name it does not know that a model here uses (``smollm``: digits one
by one, then GPT-2's byte-level split) is added.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import pre_tokenizers

from streamify.errors import InputError

GPT2, SMOLLM = "gpt-2", "smollm"


def _splits_by_regex() -> dict[str, str]:
    """The Split regex of each llama.cpp pre-tokenizer name transformers knows (first name for each regex)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    names: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, name)
    return names


def _byte_level(step: dict, regex: bool) -> bool:
    """GPT-2's byte-level step, with or without its own split, adding no prefix space (llama.cpp adds none)."""
    return (
        step.get("type") == "ByteLevel"
        and bool(step.get("use_regex", True)) == regex
        and not step.get("add_prefix_space", False)
    )


def llama_cpp_pre(tokenizer, where: str) -> str:
    """The ``tokenizer.ggml.pre`` name under which llama.cpp splits text as ``tokenizer`` does.

    Raises :class:`InputError` (exit 3) for a pre-tokenizer llama.cpp is not known to reproduce.
    """
    config = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = config.get("pretokenizers", [config]) if config.get("type") == "Sequence" else [config]
    if not steps:
        steps = [{}]
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return GPT2
    digits = steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
    if len(steps) == 2 and digits and _byte_level(steps[1], regex=True):
        return SMOLLM
    if len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1], regex=False):
        name = _splits_by_regex().get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise InputError(
        f"{where}: GGUF export cannot name this tokenizer's pre-tokenizer for llama.cpp "
        f"({json.dumps(config)[:200]}), so llama.cpp would split text differently",
        "use --weights-format compressed-tensors (recipe: weights_format) for this model",
    )


def gguf_pre(path: Path) -> str | None:
    """The ``tokenizer.ggml.pre`` name a GGUF file stores, if any."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def split_like_llama_cpp(tokenizer, pre: str) -> None:
    """Give a tokenizer transformers built from a GGUF the split llama.cpp uses for ``pre`` (in place).

    transformers sets the pre-tokenizer for the names it knows; for ``smollm``
    it leaves GPT-2's, which joins a run of spaces before a digit differently.
    """
    if pre == SMOLLM:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether ``tokenizer`` puts its BOS token first and its EOS token last when encoding text."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
    return bos, eos
