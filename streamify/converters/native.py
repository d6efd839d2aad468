"""Native export: the same weights in a transformers architecture with per-layer sliding windows.

Llama- and Mistral-family weights (no attention or MLP biases) map onto
Ministral, which has ``layer_types``; Qwen2 and Qwen3 already have them.
Native runtimes (plain transformers, vLLM) then run the ``sink_window``
layers as sliding-window layers: the same window, but no attention sinks.
"""

from __future__ import annotations

from torch import nn

from streamify.arch import arch_for
from streamify.errors import UsageError
from streamify.runtime.spec import FULL, StreamingSpec


def native_target(config) -> str:
    """The native model_type for ``config`` (its family's ``native_target`` in :mod:`streamify.arch`).

    A :class:`UsageError` when none holds its weights exactly under the same names.
    """
    model_type = config.model_type
    arch = arch_for(model_type)
    target = arch.native_target if arch else None
    has_bias = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if target is None or (has_bias and not arch.native_holds_bias):
        raise UsageError(
            f"--export-arch native: no transformers architecture with per-layer sliding windows holds "
            f"these '{model_type}' weights exactly",
            "use --export-arch same (the artifact then needs streamify.load() to stream)",
        )
    return target


def to_native(model: nn.Module, spec: StreamingSpec) -> nn.Module:
    """A new model of the native architecture holding ``model``'s weights, windowed per ``spec``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    target = native_target(model.config)
    data = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype"):
        data.pop(key, None)
    data.update(
        layer_types=["full_attention" if kind == FULL else "sliding_attention" for kind in spec.layer_types],
        sliding_window=spec.window,
        use_sliding_window=True,
        max_window_layers=0,
    )
    config = AutoConfig.for_model(target, **data)
    native = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    native.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        native.tie_weights()
    return native.to(next(model.parameters()).device).eval()
