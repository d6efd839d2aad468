"""Generation: with the bounded streaming cache on a streaming model, with transformers' cache otherwise."""

from __future__ import annotations

import functools
import time

import torch
from transformers import DynamicCache

from streamify.errors import UsageError
from streamify.runtime.attention import enable_streaming
from streamify.runtime.cache import cache_bytes, new_cache
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
) -> dict:
    """Generate from ``prompt``: with the bounded streaming cache on a streaming model, else transformers' own.

    Returns ``text``, ``new_tokens``, ``cache_bytes`` (the keys and values held at the end), ``runtime``,
    ``seconds`` (prompt and generation) and ``tokens_per_s`` (new tokens a second).
    """
    streaming = getattr(model, "streamify_controller", None) is not None
    if kv_bits is not None and not streaming:
        raise UsageError(
            "--kv-bits quantizes the streaming runtime's cache; this model does not stream",
            "drop --kv-bits, or convert the model first: streamify convert streaming",
        )
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    cache = new_cache(model, kv_bits) if streaming else DynamicCache(config=model.config)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=max_new_tokens, **sampling)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1] :]
    held = cache_bytes(cache)
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "cache_bytes": held,
        "runtime": "streaming (bounded cache)" if streaming else "transformers (full cache, grows with the text)",
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new.numel() / max(seconds, 1e-9), 2),
    }
