"""Per-layer attention layout (full, sliding, SSM, ...) as a config describes it."""

from __future__ import annotations

_KIND_NAMES = {
    "full_attention": "full",
    "attention": "full",
    "global": "full",
    "sliding_attention": "sliding",
    "local": "sliding",
    "chunked_attention": "chunked",
    "linear_attention": "linear",
    "mamba": "ssm",
}


def attention_layout(config, num_layers: int) -> list[str]:
    """One entry per block: ``full``, ``sliding``, ``sink_window``, ``ssm``, ``chunked``, ``linear``, ...

    A streamify streaming spec in the config wins: it is what ``streamify.load()`` runs.
    """
    streaming = getattr(config, "streamify_streaming", None)
    if isinstance(streaming, dict) and len(streaming.get("layer_types", [])) == num_layers:
        return list(streaming["layer_types"])
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) == num_layers:
        return [_KIND_NAMES.get(t, t) for t in layer_types]
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        first_full = getattr(config, "max_window_layers", None)
        if isinstance(first_full, int) and hasattr(config, "use_sliding_window"):
            return ["sliding" if i >= first_full else "full" for i in range(num_layers)]
        return ["sliding"] * num_layers
    return ["full"] * num_layers


def summarize_layout(layout: list[str]) -> str:
    """Compact text such as ``30× full`` or ``5× sliding, 1× full, ...`` (runs in layer order)."""
    runs: list[list] = []
    for kind in layout:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", ".join(f"{n}× {kind}" for kind, n in runs)
