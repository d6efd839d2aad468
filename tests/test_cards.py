"""What streamify tells a user about an artifact: its parameter count and the model card's usage snippet.

Every artifact kind (plain, INT4 compressed-tensors, INT4 GGUF, entropy-coded,
streaming) reports its source's parameter count, and the Python snippet of its
card runs as shown.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from streamify.io.model_card import PLACEHOLDER

KINDS = {
    "bf16": ["convert", "dtype", "--dtype", "bf16"],
    "int4-compressed-tensors": ["quantize", "int4", "--method", "rtn", "--group-size", "32"],
    "int4-gguf": ["quantize", "int4", "--method", "rtn", "--group-size", "32", "--weights-format", "gguf"],
    "entropy": ["quantize", "entropy"],
    "streaming": ["convert", "streaming", "--sinks", "2", "--window", "8"],
}


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    """One artifact of each kind, made from the tiny Llama."""
    from conftest import Cli

    cli, made = Cli(), {}
    root = tmp_path_factory.mktemp("kinds")
    for kind, (group, action, *options) in KINDS.items():
        out = root / kind
        result = cli(group, action, tiny_models["llama"], "-o", out, *options, "--no-eval")
        assert result.exit_code == 0, (kind, result.stderr)
        made[kind] = out
    return made


def _source_params(folder) -> int:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", list(KINDS))
def test_parameter_count_is_the_sources(artifacts, tiny_llama, cli, kind):
    expected = _source_params(tiny_llama)
    evaluated = cli("eval", artifacts[kind], "--max-tokens", "64", "--seq-len", "32", "--format", "json")
    assert evaluated.exit_code == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)["model"]
    assert report["params"] == expected, kind
    size = sum(p.stat().st_size for p in artifacts[kind].glob("*") if p.suffix in (".safetensors", ".gguf"))
    assert report["bits_per_weight"] == pytest.approx(size * 8 / expected)
    inspected = cli("inspect", artifacts[kind], "--format", "json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["params"] == expected
    assert json.loads(inspected.stdout)["streamify_artifact"] is True, kind  # GGUF folders included


def test_int4_bits_per_weight_from_the_bytes(artifacts, tiny_llama, cli):
    """Against the fp32 source on the same tokens: the same parameters, fewer bits per weight.

    (Fewer, not 4.5: the tiny model is mostly its fp32 embedding and head, which stay unquantized.)
    """
    result = cli(
        "eval", artifacts["int4-compressed-tensors"], "--vs", tiny_llama, "--max-tokens", "64", "--seq-len", "32",
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ratio"]["params"] == 1.0
    assert data["model"]["bits_per_weight"] < 0.75 * data["vs"]["bits_per_weight"]


def _python_snippet(card: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return code


@pytest.mark.parametrize("kind", list(KINDS))
def test_card_snippet_runs(artifacts, kind):
    card = (artifacts[kind] / "README.md").read_text()
    code = _python_snippet(card).replace(PLACEHOLDER, str(artifacts[kind]))
    namespace: dict = {}
    exec(compile(code, f"{kind}/README.md", "exec"), namespace)
    assert isinstance(namespace["model"], torch.nn.Module)
    front = yaml.safe_load(card.split("---")[1])
    if kind == "int4-gguf":
        assert "library_name" not in front and {"gguf", "llama-cpp"} <= set(front["tags"])
        assert "llm" in namespace and "from_pretrained" in code and 'gguf_file="model.gguf"' in code
    else:
        assert front["library_name"] == "transformers"
    if kind == "entropy":
        assert "from_pretrained" not in code and "streamify quantize decode" in card
