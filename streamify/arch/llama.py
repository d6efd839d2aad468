"""Llama and the families that keep its block: Mistral/Ministral, Qwen2, Qwen3 (q/k norms after the projections)."""

from streamify.arch import LLAMA_AWQ, Arch

ARCHS = (
    Arch(
        ("llama",),
        awq_groups=LLAMA_AWQ,
        streaming=True,
        native_target="ministral",
        native_holds_bias=False,  # Ministral has no attention_bias / mlp_bias
        gguf_architecture="llama",
        hybrid_source=True,
    ),
    Arch(
        ("mistral", "ministral"),
        awq_groups=LLAMA_AWQ,
        streaming=True,
        native_target="ministral",
        native_holds_bias=False,
        gguf_architecture="llama",  # llama.cpp runs Mistral as a Llama (without its sliding window)
        hybrid_source=True,  # without a sliding window (distill.hybrid checks)
    ),
    # max_window_layers: the layers from this index on use the sliding window
    Arch(
        ("qwen2",),
        awq_groups=LLAMA_AWQ,
        streaming=True,
        native_target="qwen2",
        layer_count_keys=("max_window_layers",),
        hybrid_source=True,
    ),
    Arch(
        ("qwen3",), awq_groups=LLAMA_AWQ, streaming=True, native_target="qwen3", layer_count_keys=("max_window_layers",)
    ),
)
