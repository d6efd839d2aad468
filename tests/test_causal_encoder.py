"""convert.causal on a text encoder (tiny BERT): chunk-causal mask from the arch adapter, causal LoRA."""

from __future__ import annotations

import json

import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

import streamify


def _sharp_bert(tiny_kinds, folder):
    """The tiny BERT initialised 10x wider than BERT's 0.02, so its attention is far from uniform and the mask
    matters (measured: 1 - cosine per token 0.043 under the naive mask; 3e-6 at 0.02, where nothing is learned);
    saved as a masked LM, as most hub BERTs are."""
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_kinds["encoder"])
    config.initializer_range = 0.2
    config.architectures = ["BertForMaskedLM"]
    BertForMaskedLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(tiny_kinds["encoder"]).save_pretrained(folder)
    return folder


def _eval_cosine(cli, folder, source) -> float:
    result = cli("eval", folder, "--vs", source, "--max-items", "8", "--seq-len", "64", "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["model"]["cosine_to_reference_mean"]


def test_causal_lora_brings_a_chunk_causal_bert_back_towards_its_source(tiny_kinds, cli, tmp_path):
    """The naive mask moves the embeddings away from the bidirectional source; 40 steps of causal LoRA bring
    them back (cosine of mean-pooled 64-token embeddings to the source, measured by eval: 0.9828 -> 0.9897, 40%
    of the gap); the artifact reloads chunk-causal: a prefix's token states do not depend on the tokens after
    its chunk."""
    source = _sharp_bert(tiny_kinds, tmp_path / "bert")
    common = ["--chunk-tokens", "8", "--seq-len", "64", "--format", "json"]
    naive = cli("convert", "causal", source, "-o", tmp_path / "naive", "--steps", "0", "--no-eval", *common)
    assert naive.exit_code == 0, naive.stderr
    args = ["--steps", "40", "--lr", "1e-2", "--grad-accum", "1", "--batch-size", "4", "--warmup-steps", "0"]
    trained = cli("convert", "causal", source, "-o", tmp_path / "lora", *args, "--no-eval", *common)
    assert trained.exit_code == 0, trained.stderr
    metrics = json.loads(trained.stdout)["stages"][0]["metrics"]
    assert metrics["chunk_tokens"] == 8 and metrics["train_loss_last"] < 0.9 * metrics["train_loss_first"], metrics
    before, after = (_eval_cosine(cli, tmp_path / name, source) for name in ("naive", "lora"))
    assert before < 0.99 and after > before + 0.25 * (1 - before), (before, after)

    original = BertForMaskedLM.from_pretrained(source).state_dict()
    merged = BertForMaskedLM.from_pretrained(tmp_path / "lora").state_dict()
    changed = {name for name in original if not torch.equal(original[name], merged[name])}
    assert changed and all(".attention." in name for name in changed)
    loaded, _ = streamify.load(str(tmp_path / "lora"))
    ids = torch.randint(5, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 16:] = torch.randint(5, 100, (8,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        states, changed_tail = (loaded.base_model(input_ids=x).last_hidden_state for x in (ids, other))
        bidirectional = BertModel.from_pretrained(tmp_path / "lora").eval()(input_ids=ids).last_hidden_state
    assert torch.allclose(states[:, :16], changed_tail[:, :16], atol=1e-6)  # chunks 0-1 never see chunk 2
    assert not torch.allclose(states[:, :16], bidirectional[:, :16], atol=1e-3)


def test_options_of_the_other_family_are_refused(tiny_kinds, cli, tmp_path):
    bert = cli("convert", "causal", tiny_kinds["encoder"], "-o", tmp_path / "a", "--chunk-ms", "200", "--no-eval")
    assert bert.exit_code == 2 and "chunk_ms do not apply to a text encoder" in bert.stderr, bert.stderr
    whisper = cli("convert", "causal", tiny_kinds["speech-seq2seq"], "-o", tmp_path / "b", "--chunk-tokens", "4")
    assert whisper.exit_code == 2 and "chunk_tokens do not apply to a speech model" in whisper.stderr, whisper.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_saved_causal_recipe_runs_again(tiny_kinds, cli, tmp_path):
    """--save-recipe spells out every param, the other family's defaults included: that is not a refusal."""
    for name, source in (("bert", tiny_kinds["encoder"]), ("whisper", tiny_kinds["speech-seq2seq"])):
        recipe = tmp_path / f"{name}.yaml"
        args = ["-o", tmp_path / name, "--no-eval", "--dry-run", "--save-recipe", recipe]
        saved = cli("convert", "causal", source, *args)
        assert saved.exit_code == 0, saved.stderr
        again = cli("run", recipe, "--dry-run")
        assert again.exit_code == 0, again.stderr
    too_long = cli("convert", "causal", tiny_kinds["encoder"], "-o", tmp_path / "x", "--seq-len", "1024", "--no-eval")
    assert too_long.exit_code == 2 and "longer than the model's 256 positions" in too_long.stderr
