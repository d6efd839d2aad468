"""The block-wise executor: a model built on the meta device runs with one block's weights in memory at a time,
and computes exactly what the plain transformers model computes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import streamify
from streamify.errors import InputError
from streamify.io.config import folder_config, model_class
from streamify.model.executor import BlockExecutor, SafetensorsWeights, empty_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1]])


def _materialized(blocks) -> int:
    return sum(any(p.device.type != "meta" for p in block.parameters()) for block in blocks)


def test_lazy_loading_from_safetensors_holds_one_block_and_matches_the_plain_model(tiny_llama):
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    lazy, _ = streamify.load(str(tiny_llama), lazy=True)
    blocks = lazy.model.layers
    assert _materialized(blocks) == 0 and lazy.model.embed_tokens.weight.device.type == "cpu"
    seen = []
    for block in blocks:  # registered after the executor's hooks: runs once the block is brought in
        block.register_forward_pre_hook(lambda module, args: seen.append(_materialized(blocks)))
    with torch.no_grad():
        assert torch.equal(lazy(IDS).logits, plain(IDS).logits)
    assert seen == [1] * len(blocks) and _materialized(blocks) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_running_block_by_block_gives_the_plain_models_hidden_states(tiny_models, arch):
    """The blocks run with the embeddings and head sent away (both meta), which come back equal to the
    plain model's, tied again where the model ties them (Gemma)."""
    folder = tiny_models[arch]
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = plain(IDS, output_hidden_states=True).hidden_states
    config = folder_config(folder)
    model = empty_model(model_class(config, "test"), config)
    executor = BlockExecutor(model, SafetensorsWeights(folder))
    executor.load_resident()
    model.tie_weights()
    heads = (model.get_input_embeddings, model.get_output_embeddings)
    with torch.no_grad():
        inputs = executor.first_inputs([IDS], lambda m, batch: m(batch, use_cache=False))
        assert torch.equal(inputs[0][0], expected[0])
        with executor.embeddings_away():
            assert all(head().weight.device.type == "meta" for head in heads)
            for index in range(len(executor.blocks)):
                inputs = executor.run_block(index, inputs)
                assert _materialized(executor.blocks) == 0
                if index + 1 < len(executor.blocks):  # the last entry of hidden_states is after the final norm
                    assert torch.equal(inputs[0][0], expected[index + 1]), index
    plain_heads = (plain.get_input_embeddings, plain.get_output_embeddings)
    assert all(torch.equal(ours().weight, theirs().weight) for ours, theirs in zip(heads, plain_heads, strict=True))
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (arch == "gemma")


def test_lazy_loading_refuses_weights_the_model_does_not_have(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "extra")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"1 weights are not the model's, e\.g\. model\.layers\.0\.extra\.weight"):
        streamify.load(str(folder), lazy=True)


def test_lazy_loading_refuses_a_tensor_of_the_wrong_shape(tiny_llama, tmp_path):
    """The shapes in the files are checked against the model, not trusted (the block would fail mid-forward)."""
    folder = shutil.copytree(tiny_llama, tmp_path / "reshaped")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = streamify.load(str(folder), lazy=True)
    with pytest.raises(InputError, match=r"model\.layers\.2\.mlp\.up_proj\.weight: stored as \[63, 32\]"):
        model(IDS)
