"""Load a checkpoint (HF folder, GGUF file, built-in alias, hub id) into a :class:`Checkpoint`."""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from streamify.codec.container import CodedFolder, container_paths
from streamify.codec.load import ContainerWeights, check_matches_model, load_entropy_model
from streamify.codec.restore import restore_folder
from streamify.errors import InputError, UsageError
from streamify.io.atomic import publish, temp_sibling
from streamify.io.checkpoint import Checkpoint
from streamify.io.config import (
    ct2_folder,
    folder_config,
    gguf_alone,
    gguf_cache_folder,
    gguf_config,
    is_diffusers,
    model_class,
)
from streamify.io.gguf_vocab import gguf_pre, split_like_llama_cpp
from streamify.io.manifest import read_manifest
from streamify.io.placement import config_dtype, resolve_device, torch_dtype
from streamify.io.safetensors_file import read_header
from streamify.io.source import Source, resolve_source
from streamify.io.verify import verify_artifact
from streamify.model.blocks import find_blocks
from streamify.model.executor import BlockExecutor, SafetensorsWeights, deferred_blocks, empty_model, tie_shared
from streamify.progress import SILENT, Progress
from streamify.quantize.int4.dequantized import DequantizedWeights, weight_scheme
from streamify.runtime.attention import check_streamable
from streamify.runtime.causal_video import CONFIG_KEY as VIDEO_KEY
from streamify.runtime.causal_video import VideoSpec, enable_causal_video
from streamify.runtime.chunk_causal import CONFIG_KEY as CHUNK_KEY
from streamify.runtime.chunk_causal import ChunkSpec, enable_chunk_causal
from streamify.runtime.generate import make_streaming
from streamify.runtime.spec import read_spec


class _OwnConfigKey(logging.Filter):
    """Drops diffusers' warning that it ignores config keys it does not know, when the keys are streamify's own
    (``streamify_causal_video``, ``streamify_video_timesteps``): streamify reads them after loading."""

    def filter(self, record: logging.LogRecord) -> bool:
        return VIDEO_KEY not in record.getMessage()


logging.getLogger("diffusers.configuration_utils").addFilter(_OwnConfigKey())


def load_checkpoint(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    lazy: bool = False,
    blockwise: bool = False,
    verify: bool = False,
    progress: Progress = SILENT,
) -> Checkpoint:
    """Load a model and its tokenizer from anything streamify accepts as MODEL.

    ``lazy`` runs the model block by block (:mod:`streamify.model.executor`):
    each block's weights are read from the safetensors files, or decoded from an
    entropy-coded container, right before it runs and dropped after (an INT4
    checkpoint's are dequantized). ``blockwise`` leaves the blocks on the meta
    device for a stage to bring in one at a time (``Checkpoint.blocks``).
    ``verify`` first checks a streamify artifact's files against the sha256 in
    its manifest (:func:`~streamify.io.verify.verify_artifact`).
    """
    source = resolve_source(spec)
    if verify:
        verify_artifact(source.folder)
    target = resolve_device(device)
    folder = _model_folder(source, progress)
    config = folder_config(folder, trust_remote_code)
    cls = model_class(config, spec)
    manifest = read_manifest(folder) or {}
    containers = container_paths(folder)
    quantized = getattr(config, "quantization_config", None) is not None
    if containers and not quantized:
        model = load_entropy_model(containers, config, cls, torch_dtype(dtype), target, lazy=lazy)
        return _checkpoint(model, folder, source, manifest, trust_remote_code)
    if lazy or (blockwise and not containers):
        executor = _deferred(folder, containers, config, cls, dtype, target, allow_pickle, spec, lazy)
        if lazy:
            executor.hook()
        checkpoint = _checkpoint(executor.model, folder, source, manifest, trust_remote_code)
        checkpoint.blocks = None if lazy else executor
        return checkpoint
    with _weights_folder(folder, containers, config) as weights:
        use_safetensors = _check_weight_files(weights, allow_pickle)
        options = {"local_files_only": True, "use_safetensors": use_safetensors, "output_loading_info": True}
        if is_diffusers(config):  # diffusers reads its config from the folder, names the dtype torch_dtype
            options.update(torch_dtype=torch_dtype(dtype) if dtype != "auto" else _stored_float_dtype(weights))
        else:
            options.update(
                config=config,
                dtype=torch_dtype(dtype),
                trust_remote_code=trust_remote_code,
                ignore_mismatched_sizes=True,  # reported below, with the names, instead of a bare error
            )
        try:
            model, info = cls.from_pretrained(weights, **options)
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


def load_teacher_checkpoint(spec: str, where: str, **options) -> Checkpoint:
    """:func:`load_checkpoint` of the teacher a stage reads beside its model; an InputError says it was the
    teacher (``where``: the stage) that failed."""
    try:
        return load_checkpoint(spec, **options)
    except InputError as error:
        raise InputError(f"{where}: the teacher {error.message}", error.hint) from None


def _model_folder(source: Source, progress: Progress) -> Path:
    """The transformers folder to load: the source's own, or the one a GGUF or CTranslate2 source converts to."""
    if source.kind == "gguf":
        return _materialize_gguf(source, progress)
    if source.kind == "ctranslate2":
        return ct2_folder(source, progress)
    return source.path


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_float_dtype(folder: Path) -> torch.dtype:
    """The floating-point dtype most weights of ``folder`` are stored in (diffusers would load fp32 otherwise)."""
    counts: dict[torch.dtype, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, entry in read_header(path).items():
            if name != "__metadata__" and entry["dtype"] in _SAFETENSORS_FLOATS:
                dtype = _SAFETENSORS_FLOATS[entry["dtype"]]
                counts[dtype] = counts.get(dtype, 0) + math.prod(entry["shape"])
    return max(counts, key=counts.get) if counts else torch.float32


def _deferred(
    folder: Path,
    containers: list[Path],
    config,
    cls: type,
    dtype: str,
    target,
    allow_pickle: bool,
    spec: str,
    lazy: bool,
) -> BlockExecutor:
    """The block-wise executor of the model on the meta device, reading each block from the safetensors files
    or the INT4 artifact's container; for a ``lazy`` run, an INT4 model's weights are dequantized as each block
    comes in (a block-wise stage reads floating-point weights only)."""
    model = empty_model(cls, config)
    if find_blocks(model) is None:
        raise UsageError(
            f"{spec}: block by block (--lazy, --blockwise) needs a block list; {type(model).__name__} has none",
            "load the model whole",
        )
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not lazy:
        raise UsageError(
            f"{spec}: the weights are quantized; a block-wise stage reads floating-point weights",
            "run the stage in memory (blockwise off), or give it the floating-point checkpoint",
        )
    if containers:
        reader = CodedFolder(containers)
        tie_shared(model)
        check_matches_model(containers[0], reader.index, model, quantized=True)
        weights = ContainerWeights(reader, os.cpu_count() or 1)
    elif _check_weight_files(folder, allow_pickle):
        weights = SafetensorsWeights(folder)
    else:
        raise UsageError(
            f"{spec}: block by block (--lazy, --blockwise) reads safetensors files; these weights are pickled",
            "convert the weights to safetensors, or load the model whole",
        )
    wanted = None if dtype == "auto" else torch_dtype(dtype)
    if quantization is not None:  # transformers dequantizes into the dtype the model runs in: asked, or config's
        into = wanted or config_dtype(config)
        shapes = {name: value.shape for name, value in model.state_dict(keep_vars=True).items()}
        weights = DequantizedWeights(weights, weight_scheme(quantization, spec), into, shapes, spec)
    return deferred_blocks(model, weights, target, wanted, spec)


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
def _weights_folder(folder: Path, containers: list[Path], config: PretrainedConfig) -> Iterator[Path]:
    """``folder``, or for an entropy-coded quantized artifact a temporary folder with its files restored."""
    if not containers:
        yield folder
        return
    container = containers[0]
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
    chunks = getattr(model.config, CHUNK_KEY, None)
    if chunks:  # a chunk-causal encoder (convert.causal)
        enable_chunk_causal(model, ChunkSpec.from_json(chunks))
    video = model.config.get(VIDEO_KEY) if is_diffusers(model.config) else None
    if video:  # a block-causal video denoiser (convert.causal_video)
        enable_causal_video(model, VideoSpec.from_json(video, str(folder / "config.json")), source.spec)
    return Checkpoint(
        model=model,
        tokenizer=_load_tokenizer(folder, trust_remote_code),
        processor=_load_feature_extractor(folder, trust_remote_code),
        source=source,
        history=manifest.get("history", []) + manifest.get("stages", []),
        streaming=manifest.get("streaming"),
    )


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


def _load_feature_extractor(folder: Path, trust_remote_code: bool):
    """The feature extractor of a speech model (``preprocessor_config.json``), or None."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoFeatureExtractor.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"{folder / 'preprocessor_config.json'}: unreadable feature extractor ({exc})",
            "restore the file from the original model",
        ) from exc


def _materialize_gguf(source: Source, progress: Progress) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (keyed by its sha256); return the folder."""
    folder = gguf_cache_folder(source)
    if folder.is_dir():
        return folder
    progress.log(f"dequantizing {source.path.name} once into {folder} (this takes a while)")
    config = gguf_config(source)
    model_class(config, str(source.path))
    tmp = temp_sibling(folder)  # unique to this process: two first uses at once each write their own
    try:
        kwargs = {"gguf_file": source.gguf_file, "local_files_only": True}
        try:
            with gguf_alone(source) as alone:
                model = AutoModelForCausalLM.from_pretrained(alone, dtype=torch.float32, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(alone, **kwargs)
            split_like_llama_cpp(tokenizer, gguf_pre(source.path))
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
