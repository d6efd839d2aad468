"""Generation with the bounded streaming cache."""

from __future__ import annotations

import functools

import torch

from streamify.errors import UsageError
from streamify.runtime.attention import enable_streaming
from streamify.runtime.cache import new_cache
from streamify.runtime.spec import StreamingSpec


def make_streaming(model, spec: StreamingSpec):
    """Enable streaming on ``model`` and make its ``generate`` use a fresh :class:`StreamingCache` by default."""
    enable_streaming(model, spec)
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise UsageError(
                "a streaming model generates from unpadded prompts only (the attention mask has padding)",
                "generate one prompt at a time, or prompts of equal length",
            )
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = new_cache(model)
        return original(model, *args, **kwargs)

    model.generate = generate
    return model


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    kv_bits: int | None = None,
):
    """Generate from ``prompt`` with the streaming cache; returns (text, new token count, cache bytes)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cache = new_cache(model, kv_bits)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=max_new_tokens, **sampling)
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), cache.nbytes()
