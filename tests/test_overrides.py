"""Dot-path overrides and deletions on recipe mappings."""

from __future__ import annotations

import pytest

from streamify.errors import UsageError
from streamify.pipeline.overrides import apply_overrides

RECIPE = {
    "model": "m",
    "output": "o",
    "stages": [{"convert.dtype": {"dtype": "bf16"}}, {"convert.dtype": None}],
    "eval": {"max_tokens": 10},
    "gates": {"max_perplexity": 3},
}


def test_sets_scalars_with_yaml_types():
    out = apply_overrides(RECIPE, ["output=/tmp/x", "eval.max_tokens=2048", "seed=7", "eval.vs_source=true"])
    assert out["output"] == "/tmp/x" and out["eval"]["max_tokens"] == 2048 and out["seed"] == 7
    assert out["eval"]["vs_source"] is True
    assert RECIPE["output"] == "o", "the input must not change"


def test_stage_params_are_reached_through_the_index():
    out = apply_overrides(RECIPE, ["stages.0.dtype=fp16", "stages.1.dtype=fp32"])
    assert out["stages"] == [{"convert.dtype": {"dtype": "fp16"}}, {"convert.dtype": {"dtype": "fp32"}}]


def test_deletes_keys_and_list_items():
    out = apply_overrides(RECIPE, ["~gates", "~stages.0", "~eval.max_tokens"])
    assert "gates" not in out and out["stages"] == [{"convert.dtype": None}] and out["eval"] == {}


def test_creates_missing_mappings():
    assert apply_overrides({"model": "m"}, ["gates.max_size_bytes=5"])["gates"] == {"max_size_bytes": 5}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.5.dtype=bf16", "not an index"),
        ("~nothing", "nothing to delete"),
        ("model.x=1", "inside a plain value"),
        ("model.x.y=1", "not a mapping"),
        ("justtext", "neither key=value"),
        ("a..b=1", "empty key"),
    ],
)
def test_bad_overrides_are_usage_errors(override, message):
    with pytest.raises(UsageError, match=message):
        apply_overrides(RECIPE, [override])
