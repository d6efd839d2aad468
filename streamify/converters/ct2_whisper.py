"""CTranslate2 Whisper folders (faster-whisper's format) as transformers ``WhisperForConditionalGeneration`` folders.

A CTranslate2 folder holds ``model.bin`` (CTranslate2's binary: a header, then
named variables with shape and dtype, then aliases), ``config.json`` (language
ids, suppressed tokens, alignment heads), ``vocabulary.txt`` and usually
``tokenizer.json``. The encoder's and decoder's self-attention q/k/v are stored
fused (``linear_0``, key bias zero), cross-attention keys/values fused
(``linear_1``); int8 weights carry a per-row ``weight_scale`` (``w = q / scale``).
The architecture's sizes come from the variables' shapes and its head counts
from the ``num_heads`` scalars, so any Whisper size converts.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from streamify.errors import InputError

MODEL_BIN = "model.bin"
SPEC_NAME = "WhisperSpec"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5
DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_MULTILINGUAL_VOCAB = 51865  # OpenAI's English-only models have 51864 tokens, the multilingual ones more
FIX = "convert the model again with ct2-transformers-converter, or use the transformers folder it came from"


class _Reader:
    """Sequential reads from the bytes of a model.bin, with a clear error past its end."""

    def __init__(self, path: Path):
        self.path, self.data, self.at = path, path.read_bytes(), 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise InputError(f"{self.path}: truncated CTranslate2 model (ends at byte {len(self.data):,})", FIX)
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def number(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def text(self) -> str:
        raw = self.take(self.number("H"))
        return raw[:-1].decode("utf-8", errors="replace")


def spec_name(folder: Path) -> str | None:
    """The model spec a CTranslate2 ``model.bin`` declares (``WhisperSpec``...), or None for another file."""
    path = folder / MODEL_BIN
    if not path.is_file() or path.stat().st_size < 8:
        return None
    with path.open("rb") as handle:
        head = handle.read(512)
    version, length = struct.unpack_from("<IH", head)
    if not 1 <= version <= 100 or not 1 <= length <= 200 or len(head) < 6 + length:
        return None
    return head[6 : 6 + length - 1].decode("utf-8", errors="replace")


def read_model_bin(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every variable of a CTranslate2 ``model.bin`` by name (aliases resolved), as numpy arrays (bfloat16 as
    float32), and each stored variable's CTranslate2 dtype name."""
    reader = _Reader(path)
    version = reader.number("I")
    if version < 5:
        raise InputError(f"{path}: CTranslate2 binary version {version} is older than this reader knows (5+)", FIX)
    reader.text()  # spec name
    reader.number("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(reader.number("I")):
        name = reader.text()
        shape = [reader.number("I") for _ in range(reader.number("B"))]
        kind = reader.number("B")
        raw = reader.take(reader.number("I"))
        dtypes[name] = DTYPE_NAMES.get(kind, f"id {kind}")
        if kind not in _DTYPES and kind != _BFLOAT16:
            raise InputError(f"{path}: variable {name} has an unknown CTranslate2 dtype id {kind}", FIX)
        try:
            if kind == _BFLOAT16:
                halves = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                variables[name] = halves.view(np.float32).reshape(shape)
            else:
                variables[name] = np.frombuffer(raw, dtype=_DTYPES[kind]).reshape(shape)
        except ValueError as exc:
            raise InputError(f"{path}: variable {name} holds {len(raw)} bytes, not a {shape} array", FIX) from exc
    for _ in range(reader.number("I")):
        alias, target = reader.text(), reader.text()
        if target not in variables:
            raise InputError(f"{path}: alias {alias} names a missing variable {target}", FIX)
        variables[alias] = variables[target]
    return variables, dtypes


def _float_dtype(dtypes: dict[str, str]) -> torch.dtype:
    """The dtype the converted weights keep: the model's own half type, fp32 when it has int8 or fp32 weights."""
    weights = {kind for name, kind in dtypes.items() if name.endswith("/weight")}
    if weights == {"float16"}:
        return torch.float16
    return torch.bfloat16 if weights == {"bfloat16"} else torch.float32


def _weight(variables: dict, prefix: str) -> torch.Tensor:
    """A weight in fp32; int8 ones (linears, convolutions, embeddings) dequantized by their per-row scale."""
    return _tensor(variables, f"{prefix}/weight")


def _tensor(variables: dict, name: str) -> torch.Tensor:
    """A variable in fp32; a ``…/weight`` stored in int8 is divided by its ``…/weight_scale`` (one per row)."""
    tensor = torch.from_numpy(variables[name].astype(np.float32))
    scale = variables.get(name.removesuffix("weight") + "weight_scale") if name.endswith("/weight") else None
    if scale is not None:
        tensor = tensor / torch.from_numpy(scale.astype(np.float32)).reshape(-1, *([1] * (tensor.ndim - 1)))
    return tensor


def _linear(state: dict, variables: dict, source: str, target: str) -> None:
    state[f"{target}.weight"] = _weight(variables, source)
    if f"{source}/bias" in variables:
        state[f"{target}.bias"] = _tensor(variables, f"{source}/bias")


def _norm(state: dict, variables: dict, source: str, target: str) -> None:
    state[f"{target}.weight"] = _tensor(variables, f"{source}/gamma")
    state[f"{target}.bias"] = _tensor(variables, f"{source}/beta")


def _split(state: dict, variables: dict, source: str, targets: list[str], where: Path) -> None:
    """A fused projection split into ``targets`` (q/k/v order); the key's bias must be zero (Whisper has none)."""
    weights = _weight(variables, source).chunk(len(targets))
    bias = variables.get(f"{source}/bias")
    biases = torch.from_numpy(bias.astype(np.float32)).chunk(len(targets)) if bias is not None else None
    for index, target in enumerate(targets):
        state[f"{target}.weight"] = weights[index].clone()
        if biases is None:
            continue
        if target.endswith("k_proj"):
            if biases[index].abs().max() > 0:
                raise InputError(f"{where}: {source} has a key bias, which Whisper does not", FIX)
            continue
        state[f"{target}.bias"] = biases[index].clone()


def _state_dict(variables: dict, layers: tuple[int, int], where: Path) -> dict[str, torch.Tensor]:
    """The transformers state dict of a Whisper held in CTranslate2 ``variables``."""
    state: dict[str, torch.Tensor] = {}
    for part in ("conv1", "conv2"):
        state[f"model.encoder.{part}.weight"] = _tensor(variables, f"encoder/{part}/weight")
        state[f"model.encoder.{part}.bias"] = _tensor(variables, f"encoder/{part}/bias")
    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = _tensor(variables, f"{side}/position_encodings/encodings")
        _norm(state, variables, f"{side}/layer_norm", f"model.{side}.layer_norm")
    state["model.decoder.embed_tokens.weight"] = _tensor(variables, "decoder/embeddings/weight")
    for side, count in zip(("encoder", "decoder"), layers, strict=True):
        for i in range(count):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            qkv = [f"{dst}.self_attn.{p}_proj" for p in "qkv"]
            _split(state, variables, f"{src}/self_attention/linear_0", qkv, where)
            _linear(state, variables, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            _norm(state, variables, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                cross = f"{dst}.encoder_attn"
                _linear(state, variables, f"{src}/attention/linear_0", f"{cross}.q_proj")
                _split(state, variables, f"{src}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"], where)
                _linear(state, variables, f"{src}/attention/linear_2", f"{cross}.out_proj")
                _norm(state, variables, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            _linear(state, variables, f"{src}/ffn/linear_0", f"{dst}.fc1")
            _linear(state, variables, f"{src}/ffn/linear_1", f"{dst}.fc2")
            _norm(state, variables, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return state


def _layer_count(variables: dict, side: str) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    return max(found) + 1 if found else 0


def _options(folder: Path) -> dict:
    """CTranslate2's config.json (language ids, suppressed tokens, alignment heads); empty when absent."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})", FIX) from exc


def _vocabulary(folder: Path) -> list[str]:
    path = folder / "vocabulary.txt"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines
    json_path = folder / "vocabulary.json"
    if json_path.is_file():
        return json.loads(json_path.read_text(encoding="utf-8"))
    raise InputError(f"{folder}: no vocabulary.txt or vocabulary.json beside model.bin", FIX)


def convert_ct2_whisper(folder: Path, out: Path) -> None:
    """Write a transformers Whisper folder (weights, config, generation config, tokenizer, feature extractor)."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    where = folder / MODEL_BIN
    if spec_name(folder) != SPEC_NAME:
        raise InputError(f"{where}: not a CTranslate2 Whisper model (spec {spec_name(folder)!r})", FIX)
    variables, dtypes = read_model_bin(where)
    options = _options(folder)
    vocabulary = _vocabulary(folder)
    ids = {token: index for index, token in enumerate(vocabulary)}
    layers = (_layer_count(variables, "encoder"), _layer_count(variables, "decoder"))
    try:
        embeddings = variables["decoder/embeddings/weight"]
        eot, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
        config = WhisperConfig(
            vocab_size=embeddings.shape[0],
            num_mel_bins=variables["encoder/conv1/weight"].shape[1],
            d_model=embeddings.shape[1],
            encoder_layers=layers[0],
            decoder_layers=layers[1],
            encoder_attention_heads=int(variables["encoder/num_heads"]),
            decoder_attention_heads=int(variables["decoder/num_heads"]),
            encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
            max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
            pad_token_id=eot,
            bos_token_id=eot,
            eos_token_id=eot,
            decoder_start_token_id=start,
            suppress_tokens=options.get("suppress_ids", []),
            begin_suppress_tokens=options.get("suppress_ids_begin", []),
            tie_word_embeddings=True,
        )
        state = _state_dict(variables, layers, where)
    except KeyError as exc:
        raise InputError(f"{where}: a Whisper variable or token is missing ({exc})", FIX) from exc
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing = set(model.state_dict()) - set(state) - {"proj_out.weight"}
    if missing:
        raise InputError(f"{where}: no weights for {sorted(missing)[:3]} (a Whisper of another layout?)", FIX)
    dtype = _float_dtype(dtypes)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    model.config.dtype = dtype
    model.generation_config = _generation_config(GenerationConfig, config, options, ids, vocabulary)
    model.save_pretrained(out)
    _tokenizer(WhisperTokenizerFast, folder).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)


def _generation_config(cls, config, options: dict, ids: dict[str, int], vocabulary: list[str]):
    """Whisper's decoding setup: language and task tokens for a multilingual model, timestamps, suppression."""
    multilingual = config.vocab_size >= _MULTILINGUAL_VOCAB
    generation = cls(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=options.get("alignment_heads"),
        no_timestamps_token_id=ids.get("<|notimestamps|>"),
        is_multilingual=multilingual,
    )
    if multilingual:
        generation.lang_to_id = {vocabulary[i]: i for i in options.get("lang_ids", []) if i < len(vocabulary)}
        generation.task_to_id = {task: ids[f"<|{task}|>"] for task in ("transcribe", "translate")}
    return generation


def _tokenizer(cls, folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            f"{folder}: no tokenizer.json beside model.bin (CTranslate2 keeps only the vocabulary, not the merges)",
            "copy tokenizer.json from the original model (ct2-transformers-converter --copy_files tokenizer.json)",
        )
    special = "<|endoftext|>"
    return cls(tokenizer_file=str(path), unk_token=special, bos_token=special, eos_token=special, pad_token=special)
