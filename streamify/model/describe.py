"""What a checkpoint is and which stages apply to it, read without loading its weights."""

from __future__ import annotations

from collections import Counter

from streamify.arch import family_key
from streamify.codec.container import CodedFolder, container_paths
from streamify.io.config import read_config
from streamify.io.manifest import read_manifest
from streamify.io.safetensors_file import read_header
from streamify.io.source import Source, resolve_source
from streamify.kinds import find_kind
from streamify.model.attention import attention_layout, summarize_layout
from streamify.model.blocks import find_blocks
from streamify.model.params import count_params
from streamify.pipeline.plan import meta_model
from streamify.pipeline.registry import all_stages, why_not


def stored_dtypes(source: Source) -> dict[str, int]:
    """Stored tensor types and how many tensors have each (safetensors dtypes, GGUF or CTranslate2 types)."""
    counts: Counter[str] = Counter()
    if source.kind == "gguf":
        from gguf import GGUFReader

        for tensor in GGUFReader(source.path).tensors:
            counts[tensor.tensor_type.name] += 1
    elif source.kind == "ctranslate2":
        from streamify.converters.ct2_whisper import read_model_bin

        variables, kinds = read_model_bin(source.path / "model.bin")
        counts.update(kind for name, kind in kinds.items() if variables[name].ndim)  # not the scalar settings
    elif containers := container_paths(source.path):
        for entry in CodedFolder(containers).index["tensors"].values():
            counts[entry.get("dtype", "raw") if entry["storage"] == "coded" else "raw (uncoded)"] += 1
    else:
        for path in sorted(source.path.glob("*.safetensors")):
            header = read_header(path)
            counts.update(t["dtype"] for k, t in header.items() if k != "__metadata__")
    return dict(sorted(counts.items()))


def describe(spec: str, trust_remote_code: bool = False) -> dict:
    """Architecture, parameters, blocks, attention layout, dtypes, size and applicable stages."""
    source = resolve_source(spec)
    config = read_config(source, trust_remote_code)
    model = meta_model(config, trust_remote_code)
    found = find_blocks(model)
    n_blocks = len(found[1]) if found else 0
    layout = attention_layout(config, n_blocks) if n_blocks else []
    params = count_params(model)
    size = source.size_bytes()
    manifest = read_manifest(source.folder)  # a GGUF artifact folder has one too
    containers = container_paths(source.folder) if source.kind == "hf-folder" else []
    stages = all_stages()
    reasons = {name: why_not(stage, model) for name, stage in stages.items()}  # None: the stage applies
    return {
        "model": spec,
        "path": str(source.path),
        "format": source.kind,
        "architecture": type(model).__name__,
        "model_type": family_key(config),
        "kind": getattr(find_kind(model), "name", None),
        "params": params,
        "blocks": n_blocks,
        "block_path": found[0] if found else None,
        "hidden_size": getattr(config, "hidden_size", None),
        "attention": layout,
        "attention_summary": summarize_layout(layout) if layout else None,
        "dtypes": stored_dtypes(source),
        "size_bytes": size,
        "bits_per_weight": size * 8 / params if params else None,
        "streamify_artifact": manifest is not None,
        "stages_applied": [s["name"] for s in (manifest or {}).get("history", []) + (manifest or {}).get("stages", [])],
        "applicable_stages": {name: stages[name].summary for name, why in reasons.items() if why is None},
        "other_stages": {name: why for name, why in reasons.items() if why is not None},
        "entropy": CodedFolder(containers).summary() if containers else None,
    }
