"""INT4 keys and values in the streaming cache: the grid, bounded bytes, and outputs close to full precision."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamify.runtime import enable_streaming, make_spec, new_cache
from streamify.runtime.kv_quant import Int4Codec
from streamify.runtime.kv_store import AsComputed, TokenStore


def test_int4_ring_round_trip_is_within_half_a_step():
    keys = torch.randn(1, 3, 10, 64) * torch.linspace(0.1, 4, 64)
    values = torch.randn(1, 3, 10, 64)
    held = TokenStore(Int4Codec(64, torch.float32), origin=0, capacity=6)
    held.write(keys[:, :, :6], values[:, :, :6])
    held.write(keys[:, :, 6:], values[:, :, 6:])  # tokens 6..9 overwrite the slots of 0..3
    block = held.read()
    assert block.positions.tolist() == [6, 7, 8, 9, 4, 5] and block.first == 4
    for original, got in ((keys[:, :, block.positions], block.keys), (values[:, :, block.positions], block.values)):
        grouped = original.reshape(1, 3, 6, 2, 32)
        step = (grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)) / 15
        error = (got - original).abs().reshape(1, 3, 6, 2, 32)
        assert (error <= 0.5 * step * 1.01 + 1e-3).all()
    # 4-bit codes plus a 16-bit scale and minimum per 32 values: 5 bits a value, keys and values
    assert held.nbytes() == 2 * 3 * 6 * (64 // 2 + 2 * 2 * 64 // 32)


@pytest.mark.parametrize("capacity", [None, 5])
def test_token_store_keeps_the_last_tokens_in_place(capacity):
    """A ring keeps exactly the last ``capacity`` tokens, bit for bit, with their positions, in storage allocated
    once; without a capacity every token is kept."""
    keys, values = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    store = TokenStore(AsComputed(), origin=3, capacity=capacity)
    written, storage = 0, None
    for size in (1, 2, 7, 1, 3, 6):
        store.write(keys[:, :, written : written + size], values[:, :, written : written + size])
        written += size
        block = store.read()
        order = block.positions.argsort()
        kept = written if capacity is None else min(written, capacity)
        assert block.positions[order].tolist() == list(range(3 + written - kept, 3 + written))
        assert block.first == 3 + written - kept
        assert torch.equal(block.keys[:, :, order], keys[:, :, written - kept : written])
        assert torch.equal(block.values[:, :, order], values[:, :, written - kept : written])
        if capacity is not None:
            storage = storage or store.parts[0][0].data_ptr()
            assert store.parts[0][0].data_ptr() == storage and store.nbytes() == 2 * 2 * 2 * 5 * 8 * 4


@pytest.mark.parametrize("magnitude", [1e5, 1e30])
def test_keys_beyond_fp16_range_stay_finite(magnitude):
    """Scales and minimums of an fp32 cache are bf16 (fp32's range): keys past fp16's 65504 do not become inf."""
    keys = torch.randn(1, 2, 4, 32) * magnitude
    codec = Int4Codec(32, torch.float32)
    got = codec.decode(codec.encode(keys))
    step = (keys.amax(-1, keepdim=True) - keys.amin(-1, keepdim=True)) / 15
    assert torch.isfinite(got).all()
    # half a step, plus the 16-bit rounding of the minimum and of the scale (2^-8 relative in bf16)
    bound = 0.5 * step + 2**-8 * (keys.abs().amax(-1, keepdim=True) + 15 * step)
    assert ((got - keys).abs() <= bound).all()


@torch.inference_mode()
def test_int4_cache_bytes_are_bounded_and_outputs_close(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    enable_streaming(model, make_spec(sinks=4, window=16, full_layers="none", num_layers=4))
    ids = torch.randint(1, 384, (1, 10 * 20), generator=torch.Generator().manual_seed(1))
    caches = {"full": new_cache(model), "int4": new_cache(model, kv_bits=4)}
    logits = {name: [] for name in caches}
    sizes = []
    for token in ids[0]:
        for name, cache in caches.items():
            logits[name].append(model(token.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1])
        sizes.append(caches["int4"].nbytes())
    full, int4 = torch.stack(logits["full"]), torch.stack(logits["int4"])
    # head_dim 8: one group of 8 a head, 4 bits + 2 fp16 per 8 values; the 4 sinks stay fp32
    per_recent_token = 4 * 2 * 2 * (8 // 2 + 2 * 2)  # layers x (k, v) x kv heads x bytes
    per_sink_token = 4 * 2 * 2 * 8 * 4
    assert max(sizes) == sizes[-1] == 4 * per_sink_token + 15 * per_recent_token
    assert caches["full"].nbytes() == 19 * per_sink_token
    # nothing is quantized before a token's own step has passed: the first steps differ by rounding only (the
    # full-precision cache holds its keys rotated once, the INT4 one rotates them at each step)
    scale = full.abs().max().item()
    assert (full[:5] - int4[:5]).abs().max().item() <= 1e-6 * scale
    difference = (full - int4).abs().max().item()
    assert 1e-3 * scale < difference < 0.1 * scale


def test_kv_bits_other_than_4_are_refused(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    enable_streaming(model, make_spec(sinks=4, window=16, full_layers="none", num_layers=4))
    with pytest.raises(Exception, match="--kv-bits 8"):
        new_cache(model, kv_bits=8)


def test_stream_eval_with_int4_cache(cli, tiny_llama, tmp_path):
    out = tmp_path / "stream"
    assert (
        cli("convert", "streaming", tiny_llama, "-o", out, "--sinks", "2", "--window", "16", "--no-eval").exit_code == 0
    )
    import json

    runs = {}
    for bits in (None, 4):
        extra = ["--kv-bits", "4"] if bits else []
        result = cli("eval", out, "--stream", "--tokens", "256", "--format", "json", *extra)
        assert result.exit_code == 0, result.stderr
        runs[bits] = json.loads(result.stdout)["stream"]
    assert runs[4]["kv_bits"] == 4 and runs[4]["cache_bytes_max"] < 0.5 * runs[None]["cache_bytes_max"]
    assert runs[4]["perplexity"] != runs[None]["perplexity"]
    assert abs(runs[4]["perplexity"] / runs[None]["perplexity"] - 1) < 0.05
    plain = cli("eval", tiny_llama, "--stream", "--tokens", "64", "--kv-bits", "4")
    assert plain.exit_code == 2 and "needs a streaming model" in plain.stderr
