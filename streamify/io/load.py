"""Load a checkpoint (HF folder, GGUF file, built-in alias, hub id) into a :class:`Checkpoint`."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from streamify.errors import InputError, UsageError
from streamify.io.atomic import publish, temp_sibling
from streamify.io.checkpoint import Checkpoint
from streamify.io.placement import resolve_device, torch_dtype
from streamify.io.safetensors_file import read_header
from streamify.io.source import Source, resolve_source
from streamify.progress import SILENT, Progress
from streamify.quantize.entropy_format import CONTAINER_NAME
from streamify.runtime.attention import check_streamable
from streamify.runtime.generate import make_streaming
from streamify.runtime.spec import read_spec

MANIFEST_NAME = "streamify.json"


def cache_root() -> Path:
    """streamify's cache folder: ``$STREAMIFY_CACHE_DIR`` or the user cache dir."""
    env = os.environ.get("STREAMIFY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("streamify"))


def read_config(source: Source, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model config, read without touching any weights."""
    if source.kind == "gguf":
        cached = _gguf_cache_folder(source)
        if cached.is_dir():
            return _folder_config(cached, trust_remote_code)
        return _gguf_config(source)
    return _folder_config(source.path, trust_remote_code)


def model_class(config: PretrainedConfig, where: str) -> type:
    """The transformers class for a config: the one ``architectures`` names, else causal LM, else bare model."""
    import transformers

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


def instantiate(cls: type, config: PretrainedConfig, trust_remote_code: bool = False):
    """A model of ``cls`` built from ``config`` (random or empty weights, per the active device context)."""
    if hasattr(cls, "from_config"):  # an Auto class
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls(config)


def read_manifest(folder: Path) -> dict | None:
    """The streamify manifest of an artifact folder, or None for other checkpoints."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})", "restore the file or re-create the artifact") from exc
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a JSON object", "restore the file or re-create the artifact")
    return manifest


def load_checkpoint(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    lazy: bool = False,
    verify: bool = False,
    progress: Progress = SILENT,
) -> Checkpoint:
    """Load a model and its tokenizer from anything streamify accepts as MODEL.

    ``lazy`` applies to entropy-coded artifacts: blocks are decoded during the
    forward pass instead of at load time. ``verify`` first checks a streamify
    artifact's files against the sha256 in its manifest
    (:func:`~streamify.io.verify.verify_artifact`).
    """
    source = resolve_source(spec)
    if verify:
        from streamify.io.verify import verify_artifact

        verify_artifact(source.folder)
    target = resolve_device(device)
    folder = _materialize_gguf(source, progress) if source.kind == "gguf" else source.path
    config = _folder_config(folder, trust_remote_code)
    cls = model_class(config, spec)
    manifest = read_manifest(folder) or {}
    container = folder / CONTAINER_NAME
    if container.is_file() and getattr(config, "quantization_config", None) is None:
        from streamify.quantize.entropy_load import load_entropy_model

        model = load_entropy_model(container, config, cls, torch_dtype(dtype), target, lazy=lazy)
        return _checkpoint(model, folder, source, manifest, trust_remote_code)
    with _weights_folder(folder, container, config, lazy) as weights:
        use_safetensors = _check_weight_files(weights, allow_pickle)
        try:
            model, info = cls.from_pretrained(
                weights,
                config=config,
                dtype=torch_dtype(dtype),
                local_files_only=True,
                use_safetensors=use_safetensors,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, with the names, instead of a bare error
            )
        except pickle.UnpicklingError as exc:
            raise InputError(
                f"{spec}: the pickled weights were refused as unsafe: torch's weights-only loader found "
                f"objects other than tensors ({str(exc).splitlines()[0]})",
                "convert the weights to safetensors with a tool you trust; streamify never runs pickled code",
            ) from exc
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise InputError(f"{spec}: transformers could not load the weights: {exc}", "check the files") from exc
    _check_loading_info(spec, info)
    model.to(target).eval()
    return _checkpoint(model, folder, source, manifest, trust_remote_code)


def _check_loading_info(spec: str, info: dict) -> None:
    """Refuse weights that do not fit the config: missing, of the wrong shape, or left unused."""
    problems = {
        "missing_keys": "weights are missing from the checkpoint",
        "mismatched_keys": "weights have a shape that config.json does not give them",
        "unexpected_keys": "weights in the files are not used by the model config.json describes",
    }
    for key, what in problems.items():
        names = sorted(str(n[0] if isinstance(n, tuple) else n) for n in info.get(key) or ())
        if names:
            raise InputError(
                f"{spec}: {len(names)} {what}, e.g. {', '.join(names[:5])}",
                "the weight files do not match config.json; re-download or re-create the checkpoint",
            )


@contextmanager
def _weights_folder(folder: Path, container: Path, config: PretrainedConfig, lazy: bool) -> Iterator[Path]:
    """``folder``, or for an entropy-coded quantized artifact a temporary folder with its files restored."""
    if not container.is_file():
        yield folder
        return
    if lazy:
        raise UsageError(
            f"{container}: --lazy decodes floating-point weights block by block; these weights are quantized",
            "load it without --lazy",
        )
    from streamify.quantize.entropy_restore import restore_folder

    with tempfile.TemporaryDirectory(prefix="streamify-restore-", ignore_cleanup_errors=True) as tmp:
        try:
            restore_folder(folder, Path(tmp), config, threads=os.cpu_count() or 1)
        except OSError as exc:
            raise InputError(
                f"{container}: could not restore the quantized files into {tmp} ({exc})",
                "free space in the temporary folder ($TMPDIR), or decode once with streamify quantize decode",
            ) from exc
        yield Path(tmp)


def _checkpoint(model, folder: Path, source: Source, manifest: dict, trust_remote_code: bool) -> Checkpoint:
    spec = read_spec(model.config, str(folder / "config.json"))
    if spec is not None:
        check_streamable(model, source.spec)
        make_streaming(model, spec)
    return Checkpoint(
        model=model,
        tokenizer=_load_tokenizer(folder, trust_remote_code),
        source=source,
        history=manifest.get("history", []) + manifest.get("stages", []),
        streaming=manifest.get("streaming"),
    )


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


def _folder_config(folder: Path, trust_remote_code: bool) -> PretrainedConfig:
    path = folder / "config.json"
    restore = "restore config.json from the original model"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})", restore) from exc
    if not isinstance(raw, dict):
        raise InputError(f'{path}: not a JSON object (a config is {{"model_type": ..., ...}})', restore)
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


def _check_weight_files(folder: Path, allow_pickle: bool) -> bool:
    """Validate safetensors files; refuse pickled weights unless allowed. Returns use_safetensors."""
    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        read_header(path)
    if safetensors:
        return True
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if not pickled:
        raise InputError(f"{folder}: no weight files (*.safetensors)", "point at a folder that holds the weights")
    if not allow_pickle:
        raise InputError(
            f"{folder}: weights are only in pickle files ({', '.join(pickled)}), which can run code when loaded",
            "pass --allow-pickle if you trust this checkpoint, or convert it to safetensors",
        )
    return False


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    names = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json"}
    if not any((folder / n).exists() for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{folder}: tokenizer files are unreadable ({exc})", "restore the tokenizer files") from exc


def _gguf_cache_folder(source: Source) -> Path:
    sha = source.hash_files()[0].sha256
    return cache_root() / "gguf" / sha


def _gguf_config(source: Source) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{source.path}: unreadable or unsupported GGUF file ({exc})", "check the file") from exc


def _materialize_gguf(source: Source, progress: Progress) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (keyed by its sha256); return the folder."""
    folder = _gguf_cache_folder(source)
    if folder.is_dir():
        return folder
    progress.log(f"dequantizing {source.path.name} once into {folder} (this takes a while)")
    config = _gguf_config(source)
    model_class(config, str(source.path))
    tmp = temp_sibling(folder)  # unique to this process: two first uses at once each write their own
    try:
        kwargs = {"gguf_file": source.gguf_file, "local_files_only": True}
        try:
            model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        except (ValueError, KeyError, OSError) as exc:
            raise InputError(f"{source.path}: could not read the GGUF weights ({exc})", "check the file") from exc
        # The GGUF marker says "quantized"; the weights are now dequantized floats, so drop it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish(tmp, folder, complete=lambda f: (f / "config.json").is_file())  # the first writer wins
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
