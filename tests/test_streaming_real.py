"""Streaming conversion of the real SmolLM2-135M: the runtime against the StreamingLLM reference, and healing."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.real
MODEL = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """SmolLM2 with 4 sinks, a 64-token window and the middle third of its layers kept full."""
    from typer.testing import CliRunner

    from streamify.cli.app import app

    out = tmp_path_factory.mktemp("smollm2") / "hybrid"
    args = ["convert", "streaming", MODEL, "-o", str(out), "--window", "64", "--full-layers", "middle-third"]
    result = CliRunner().invoke(app, [*args, "--no-eval"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def test_runtime_equals_the_streamingllm_reference_on_smollm2(hybrid, cli):
    """The window rolls about three times; chunks of 1, 7 and 64 all match the stock model token by token (fp32).

    The bound, 2e-5 of the logits' largest magnitude (~37.6 here, so ~7.5e-4), is
    about 5x the worst of 6 runs under 1 and 2 threads and three CPU kernel sets
    (benchmarks/equivalence_spread.py: 2.6e-6 to 4.2e-6 of the scale, 9.9e-5 to
    1.6e-4 absolute), and 25,000x below what a mask fault makes on these tokens (18.5 absolute).
    """
    result = cli("eval", hybrid, "--check", "equivalence", "--tokens", "220", "--format", "json")
    assert result.exit_code == 0, result.stderr
    equivalence = json.loads(result.stdout)["equivalence"]
    assert set(equivalence["per_chunk"]) == {"1", "7", "64"}
    assert 10 < equivalence["max_abs_logit"] < 100, equivalence
    assert equivalence["max_rel_diff"] <= 2e-5, equivalence
    scaled = equivalence["max_rel_diff"] * equivalence["max_abs_logit"]
    assert math.isclose(equivalence["max_abs_diff"], scaled, rel_tol=1e-9)


def test_stream_eval_on_smollm2_keeps_sink_window_layers_flat(hybrid, cli):
    result = cli("eval", hybrid, "--stream", "--tokens", "400", "--chunk", "16", "--format", "json")
    assert result.exit_code == 0, result.stderr
    stream = json.loads(result.stdout)["stream"]
    per_token_full = 10 * 2 * 3 * 64 * 4  # 10 full layers x (k, v) x 3 kv heads x head_dim 64 x fp32
    per_sink_window = 20 * (4 + 64 - 1) * 2 * 3 * 64 * 4
    assert stream["cache_bytes_last"] == per_sink_window + 400 * per_token_full
    assert 1 < stream["perplexity"] < 100


def test_healing_lowers_smollm2_heldout_kl(tmp_path, cli):
    """30 LoRA steps on 128-token sequences (window 32) lower held-out KL to the full-attention teacher.

    Measured on this machine (2026-12-01): 0.170111 before, 0.168754 after with 1 thread and with 2
    (identical to 6 digits), a fall of 0.00136. The test asks for a fall of 5e-4: about a third of the
    measured one, and hundreds of times the thread-to-thread spread. A larger learning rate is no
    way to a larger margin: 1e-3 raised the KL (0.1716). BENCHMARKS.md has the long runs.
    """
    args = ["--window", "32", "--heal-steps", "30", "--heal-lr", "4e-4", "--heal-seq-len", "128"]
    result = cli(
        "convert",
        "streaming",
        MODEL,
        "-o",
        tmp_path / "h",
        *args,
        "--heal-grad-accum",
        "1",
        "--no-eval",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["stages"][0]["metrics"]
    assert metrics["heldout_kl_after"] < metrics["heldout_kl_before"] - 5e-4, metrics
