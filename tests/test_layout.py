"""The package's shape: no import cycles between its modules, stages and architectures found, not listed."""

from __future__ import annotations

import ast
from pathlib import Path

import streamify
from streamify.arch import arch_for, supported
from streamify.pipeline.registry import all_stages, stage_modules

PACKAGE = Path(streamify.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``path`` imports, at the top or inside functions alike."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("streamify"):
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("streamify")]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            targets.add(name)
    return targets


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or round a loop (a package importing its own parent is fine)."""
    modules = _modules()
    graph = {
        name: {t for t in _imports(path, modules) if t != name and not name.startswith(f"{t}.")}
        for name, path in modules.items()
    }
    assert _cycles(graph) == []


def test_a_planted_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_are_found_in_their_modules():
    stages = all_stages()
    assert set(stages) >= {"convert.dtype", "convert.streaming", "distill.heal", "prune.depth", "quantize.int4"}
    for stage in stages.values():
        assert stage.run.__module__ in stage_modules(), stage.name


def test_architecture_facts_live_in_one_place():
    """Each family is declared once; stages ask streamify.arch instead of listing model types."""
    assert arch_for("gemma2").awq_groups[2].previous == "pre_feedforward_layernorm"
    assert arch_for("qwen2").layer_count_keys == ("max_window_layers",)
    assert "llama" in supported("streaming") and "gpt2" not in supported("awq_groups")
    for path in PACKAGE.rglob("*.py"):
        if "arch" not in path.relative_to(PACKAGE).parts:
            text = path.read_text()
            assert '"qwen3"' not in text and '"ministral"' not in text, path


def test_inspect_lists_only_the_stages_that_apply(cli, tiny_models):
    """GPT-2 (Conv1D projections, no streaming adapter) gets the stages that can run on it, and why not the rest."""
    import json

    llama = json.loads(cli("inspect", tiny_models["llama"], "--format", "json").stdout)
    video = {"convert.causal_video", "distill.ode_init", "distill.self_forcing"}
    other_kinds = {"convert.causal", *video}  # speech and encoders; video denoisers
    assert set(llama["applicable_stages"]) == set(all_stages()) - other_kinds
    assert set(llama["other_stages"]) == other_kinds and "speech-seq2seq" in llama["other_stages"]["convert.causal"]
    assert "denoiser" in llama["other_stages"]["convert.causal_video"]
    gpt2 = json.loads(cli("inspect", tiny_models["gpt2"], "--format", "json").stdout)
    assert {"convert.streaming", "quantize.int4", "distill.hybrid", *other_kinds} == set(gpt2["other_stages"])
    assert {"convert.dtype", "prune.depth", "distill.heal", "quantize.entropy"} <= set(gpt2["applicable_stages"])
