"""Write an INT4 artifact as a GGUF file that llama.cpp runs, with the ``gguf`` package.

Q4_0 and Q4_1 are the INT4 grid of :mod:`streamify.quantize.int4.grid` with a
group of 32: a block stores its scale ``d`` as fp16 (Q4_1 also ``m``), then 16
bytes holding codes ``q = code + 8`` in [0, 15] (weight ``j`` in the low nibble
of byte ``j``, weight ``j + 16`` in the high nibble). Q4_0: ``w = (q - 8)·d``;
Q4_1: ``w = q·d + m`` with ``m = -(8 + zero)·d``. Our codes are packed as they
are, so llama.cpp computes with exactly the weights streamify measured (Q4_1:
up to the fp16 rounding of ``m``). Q4_K packs the codes made on its own grid
(:mod:`streamify.quantize.int4.kquant`); a layer whose rows do not fill whole
256-weight super-blocks is written Q4_1.

Llama-architecture decoders only (Llama, SmolLM, Mistral without sliding
windows): the tensor names follow gguf's name map, query and key rows are
permuted to llama.cpp's rotary layout, and the tokenizer is copied from a GGUF
source or built from the HF tokenizer (byte-level BPE: its pre-tokenizer named
as llama.cpp knows it, BOS/EOS added as the HF tokenizer adds them); rope
scaling is written as llama.cpp reads it (linear; Llama 3's as ``rope_freqs``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from streamify import __version__
from streamify.arch import require
from streamify.errors import InputError
from streamify.io.checkpoint import Checkpoint
from streamify.io.gguf_vocab import adds_special, llama_cpp_pre
from streamify.quantize.int4.grid import Int4Weight
from streamify.quantize.int4.kquant import pack_q4_k

GGUF_NAME = "model.gguf"


def pack_q4(weight: Int4Weight, qtype: str) -> np.ndarray:
    """GGUF Q4_0 / Q4_1 blocks of ``weight`` (group 32) as bytes ``[out, in / 32 * block bytes]``."""
    rows, columns = weight.codes.shape
    q = (weight.codes.cpu().to(torch.int16) + 8).to(torch.uint8).reshape(rows, columns // 32, 32).numpy()
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    scale = weight.scale.cpu().to(torch.float16)
    parts = [scale.numpy()[..., None].view(np.uint8)]
    if qtype == "Q4_1":
        minimum = (-(8 + weight.zero.cpu().to(torch.float32)) * scale.float()).to(torch.float16)
        parts.append(minimum.numpy()[..., None].view(np.uint8))
    blocks = np.concatenate([*parts, nibbles], axis=-1)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def _permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary halves -> llama.cpp's interleaved pairs, per head (rows only; groups stay whole)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _permuted(weight: Int4Weight, heads: int) -> Int4Weight:
    extra = [_permute_rows(t, heads) if t is not None else None for t in (weight.super_scales, weight.sub_scales)]
    return Int4Weight(
        _permute_rows(weight.codes, heads),
        _permute_rows(weight.scale, heads),
        _permute_rows(weight.zero, heads),
        weight.group_size,
        *extra,
    )


def _pack(weight: Int4Weight, qtype: str) -> tuple[np.ndarray, str]:
    """The GGUF bytes of one quantized linear and their type (Q4_K weights in Q4_K, the others in Q4_0/Q4_1)."""
    if weight.super_scales is not None:
        return pack_q4_k(weight.codes, weight.super_scales, weight.sub_scales), "Q4_K"
    block_type = "Q4_1" if qtype == "Q4_K" else qtype
    return pack_q4(weight, block_type), block_type


def check_exportable(model, where: str) -> str:
    """The llama.cpp architecture ``model`` is written as; exit 3 for one this writer does not map."""
    arch = require(model.config.model_type, "gguf_architecture", "GGUF export", where)
    windowed = getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True)
    if windowed:
        raise InputError(
            f"{where}: GGUF export writes llama.cpp's Llama architecture, which has no sliding window; "
            f"this {type(model).__name__} uses one ({model.config.sliding_window} tokens)",
            "use --weights-format compressed-tensors (recipe: weights_format) for this model",
        )
    rope = _rope_type(model.config)
    if rope not in ROPE_TYPES:
        raise InputError(
            f"{where}: GGUF export writes rope scaling {', '.join(ROPE_TYPES)}; this model's is '{rope}'",
            "use --weights-format compressed-tensors (recipe: weights_format) for this model",
        )
    return arch.gguf_architecture


ROPE_TYPES = ("default", "linear", "llama3")


def _rope_type(config) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def _add_rope_scaling(writer, model) -> None:
    """Rope scaling as llama.cpp reads it: linear by its factor, Llama 3's as per-frequency divisors."""
    import gguf

    params = model.config.rope_parameters
    kind = _rope_type(model.config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "llama3":  # llama.cpp divides each frequency by rope_freqs; transformers' table is the reference
        scaled = getattr(model, model.base_model_prefix).rotary_emb.inv_freq.double()
        dim = 2 * scaled.numel()
        plain = 1.0 / float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(name, (plain / scaled.cpu()).numpy().astype(np.float32))


def q8_0(tensor: torch.Tensor) -> np.ndarray:
    """GGUF Q8_0 blocks of a 2-D tensor (32 weights, an fp16 scale each), by ``gguf``'s own quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(tensor.detach().float().cpu().numpy(), GGMLQuantizationType.Q8_0)


@torch.no_grad()
def round_like_gguf(model, quantized: set[str], embedding: str) -> dict:
    """Give ``model``'s unquantized weights the values the GGUF file stores, so the eval measures the file.

    The token embedding goes through Q8_0 (``embedding`` "Q8_0") or fp16, other
    matrices through fp16; vectors (norms, biases) stay fp32, as written.
    Returns what was rounded how.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    table = model.get_input_embeddings().weight
    rounded: dict[str, str] = {}
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] in quantized or param.ndim != 2:
            continue
        if param is table and embedding == "Q8_0":
            values = dequantize(q8_0(param), GGMLQuantizationType.Q8_0)
            param.copy_(torch.from_numpy(values).to(param.dtype))
            rounded[name] = "Q8_0"
        else:
            param.copy_(param.to(torch.float16).to(param.dtype))
            rounded[name] = "F16"
    return rounded


def write_gguf(
    checkpoint: Checkpoint, quantized: dict[str, Int4Weight], qtype: str, folder: Path, embedding: str = "F16"
) -> None:
    """Write ``folder/model.gguf``: metadata, tokenizer, ``quantized`` linears in ``qtype``, the rest in F16/F32.

    The token embedding is written in ``embedding`` (Q8_0 or F16). ``qtype`` F16 with nothing quantized
    writes the float model (to hand to llama.cpp's own quantizer).
    """
    import gguf

    model = checkpoint.model
    architecture = check_exportable(model, checkpoint.source.spec)
    config = model.config
    blocks = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(folder / GGUF_NAME), architecture)
    writer.add_name(checkpoint.source.base_model or checkpoint.source.spec)
    writer.add_string("general.quantized_by", f"streamify {__version__}")
    writer.add_block_count(blocks)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{'Q4_K_S' if qtype == 'Q4_K' else qtype}")))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, checkpoint, config.vocab_size)
    _add_rope_scaling(writer, model)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], blocks)  # gguf's own name map
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    table = model.get_input_embeddings().weight
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            continue  # buffers such as rotary inv_freq
        module = name.rsplit(".", 1)[0]
        rotary = heads.get(module.rsplit(".", 1)[-1])
        if module in quantized:
            weight = _permuted(quantized[module], rotary) if rotary else quantized[module]
            data, block_type = _pack(weight, qtype)
            writer.add_tensor(target, data, raw_dtype=getattr(gguf.GGMLQuantizationType, block_type))
            continue
        if tensor is table and embedding == "Q8_0":
            writer.add_tensor(target, q8_0(tensor), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        data = tensor.detach().float().cpu()  # the model may be on a GPU
        if rotary:
            data = _permute_rows(data, rotary)
        kind = np.float32 if data.ndim == 1 else np.float16
        writer.add_tensor(target, data.numpy().astype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_vocab(checkpoint: Checkpoint) -> None:
    """Exit 3 unless the checkpoint's tokenizer can be written so that llama.cpp tokenizes as it does."""
    if checkpoint.source.kind != "gguf":
        _bpe_model(checkpoint)
        llama_cpp_pre(checkpoint.tokenizer, checkpoint.source.spec)


def _bpe_model(checkpoint: Checkpoint) -> dict:
    backend = getattr(checkpoint.tokenizer, "backend_tokenizer", None)
    model_json = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model_json.get("type") != "BPE":
        raise InputError(
            f"{checkpoint.source.spec}: GGUF export needs a byte-level BPE tokenizer (tokenizer.json)",
            "use --weights-format compressed-tensors (recipe: weights_format) for this model",
        )
    return model_json


def _add_tokenizer(writer, checkpoint: Checkpoint, vocab_size: int) -> None:
    """Copy the tokenizer of a GGUF source; otherwise describe the HF byte-level BPE tokenizer."""
    import gguf

    if checkpoint.source.kind == "gguf":
        reader = gguf.GGUFReader(str(checkpoint.source.path))
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                value_type = field.types[0]
                sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
        return
    tokenizer = checkpoint.tokenizer
    model_json = _bpe_model(checkpoint)
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(index) if index < len(tokenizer) else None
        tokens.append(token if token is not None else f"[PAD{index}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre(tokenizer, checkpoint.source.spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(token_id)
    add_bos, add_eos = adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
