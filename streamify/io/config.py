"""A checkpoint's config and its transformers class, read and checked without touching any weights."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from streamify.errors import InputError, UsageError
from streamify.io.atomic import publish, temp_sibling
from streamify.io.cache import cache_root
from streamify.io.source import Source
from streamify.progress import SILENT, Progress


def read_config(source: Source, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model config, read without touching any weights."""
    if source.kind == "gguf":
        cached = gguf_cache_folder(source)
        if cached.is_dir():
            return folder_config(cached, trust_remote_code)
        return gguf_config(source)
    if source.kind == "ctranslate2":
        return folder_config(ct2_folder(source), trust_remote_code)
    return folder_config(source.path, trust_remote_code)


DIFFUSERS_KEY = "_diffusers_version"  # in the config.json of every model diffusers saves


def is_diffusers(config: Any) -> bool:
    """True for a diffusers model config (a mapping with ``_class_name``), False for a transformers one."""
    return isinstance(config, Mapping) and "_class_name" in config


def model_class(config: Any, where: str) -> type:
    """The model class for a config.

    transformers: the one ``architectures`` names, else causal LM, else bare model;
    diffusers: the model class its ``_class_name`` names.
    """
    import transformers

    if is_diffusers(config):
        return _diffusers_class(config["_class_name"], where)
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    if type(config) in MODEL_MAPPING:
        return AutoModel
    raise InputError(
        f"{where}: architecture '{config.model_type}' has no model class in transformers",
        "streamify handles the architectures transformers ships; convert the checkpoint to one of them",
    )


def _diffusers_class(name: str, where: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise InputError(
            f"{where}: '{name}' is not a model class of diffusers {diffusers.__version__}",
            "streamify loads the model classes diffusers ships; upgrade diffusers or convert the model",
        )
    return cls


def instantiate(cls: type, config: Any, trust_remote_code: bool = False):
    """A model of ``cls`` built from ``config`` (random or empty weights, per the active device context)."""
    if is_diffusers(config):
        return cls.from_config(config)
    if hasattr(cls, "from_config"):  # an Auto class
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls(config)


# Sizes every architecture reads as positive integers; a wrong type or value here fails deep inside torch.
_POSITIVE_INT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


def folder_config(folder: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """``folder/config.json`` as transformers reads it, after checks that name the file and the key."""
    path = folder / "config.json"
    restore = "restore config.json from the original model"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})", restore) from exc
    if not isinstance(raw, dict):
        raise InputError(f'{path}: not a JSON object (a config is {{"model_type": ..., ...}})', restore)
    if DIFFUSERS_KEY in raw:
        return _diffusers_config(path, raw)
    for key in _POSITIVE_INT_KEYS:
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{path}: '{key}' is {value!r}; it must be a positive integer", restore)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (TypeError, KeyError, AttributeError, StrictDataclassError) as exc:
        message = " ".join(str(exc).split())
        raise InputError(f"{path}: transformers rejects this config ({message})", restore) from exc
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise UsageError(
                f"{folder}: this model ships its own code",
                "read that code, then pass --trust-remote-code if you trust it",
            ) from exc
        model_type = json.loads(path.read_text()).get("model_type", "?")
        raise InputError(
            f"{path}: unsupported architecture (model_type '{model_type}')",
            "streamify handles the architectures transformers ships; upgrade transformers or convert the model",
        ) from exc


def _diffusers_config(path: Path, raw: dict) -> Mapping:
    """A diffusers model's config as its class reads it (defaults filled in), after checking the class exists."""
    cls = _diffusers_class(str(raw.get("_class_name")), str(path))
    try:
        with torch.device("meta"):
            return cls.from_config(raw).config
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        message = " ".join(str(exc).split())
        raise InputError(f"{path}: diffusers rejects this config ({message})", "restore config.json") from exc


GGUF_CACHE_VERSION = 3  # 2: read from the GGUF file alone; 3: the tokenizer splits text as llama.cpp does


def gguf_cache_folder(source: Source) -> Path:
    """Where the dequantized copy of a GGUF source is kept (keyed by the file's sha256)."""
    sha = source.hash_files()[0].sha256
    return cache_root() / "gguf" / f"{sha}.v{GGUF_CACHE_VERSION}"


CT2_CACHE_VERSION = 1


def ct2_folder(source: Source, progress: Progress = SILENT) -> Path:
    """The transformers folder a CTranslate2 Whisper source converts to, made once (keyed by model.bin's sha256).

    Converting takes seconds, so the plan and ``inspect`` read the config from it too.
    """
    from streamify.converters.ct2_whisper import convert_ct2_whisper

    folder = cache_root() / "ctranslate2" / f"{source.fingerprint()}.v{CT2_CACHE_VERSION}"
    if folder.is_dir():
        return folder
    progress.log(f"converting the CTranslate2 model {source.path} once into {folder}")
    tmp = temp_sibling(folder)
    try:
        convert_ct2_whisper(source.path, tmp)
        publish(tmp, folder, complete=lambda f: (f / "config.json").is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextmanager
def gguf_alone(source: Source) -> Iterator[Path]:
    """A temporary folder holding only a link to the GGUF file.

    transformers reads a ``config.json`` or tokenizer files found beside a GGUF
    file and mixes them with the GGUF's own metadata; read from here, what it
    builds comes from the GGUF file alone.
    """
    with tempfile.TemporaryDirectory(prefix="streamify-gguf-") as tmp:
        (Path(tmp) / source.gguf_file).symlink_to(source.path.resolve())
        yield Path(tmp)


def gguf_config(source: Source) -> PretrainedConfig:
    """The config transformers reads from a GGUF file's metadata."""
    try:
        with gguf_alone(source) as folder:
            return AutoConfig.from_pretrained(folder, gguf_file=source.gguf_file, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{source.path}: unreadable or unsupported GGUF file ({exc})", "check the file") from exc
