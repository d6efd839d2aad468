"""Data sources and token blocks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from streamify.data.blocks import token_blocks
from streamify.data.pydoc import pydoc_texts
from streamify.data.sources import load_texts
from streamify.errors import InputError, UsageError


def test_pydoc_split_is_fixed_and_disjoint():
    train, heldout = pydoc_texts("train"), pydoc_texts("heldout")
    assert len(train) > 300 and len(heldout) > 20
    assert not set(train) & set(heldout)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.2
    pydoc_texts.cache_clear()
    assert pydoc_texts("heldout") == heldout, "the split must be deterministic"


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["from parquet"], "other": [1]}), tmp_path / "c.parquet")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["first", "second"]
    assert load_texts(str(tmp_path / "c.parquet")) == ["from parquet"]
    assert load_texts(str(tmp_path)) == ["plain text file", "first", "second", "from parquet"]


def test_bad_data_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match="line 2 has no string field 'text'"):
        load_texts(str(bad))
    with pytest.raises(InputError, match="no such file"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        load_texts("hf:wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(UsageError, match="unknown built-in"):
        load_texts("builtin:nope")


def test_token_blocks_shape_order_and_seeded_sampling(tokenizer_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    texts = list(pydoc_texts("heldout"))
    blocks = token_blocks(tok, texts, seq_len=64, max_tokens=1000)
    assert blocks.shape == (15, 64) and blocks.dtype == torch.long
    expected = tok(texts[0], add_special_tokens=False)["input_ids"][:64]
    assert blocks[0].tolist() == expected, "unshuffled blocks start with the first text"
    a = token_blocks(tok, texts, 64, 640, seed=1)
    assert torch.equal(a, token_blocks(tok, texts, 64, 640, seed=1))
    assert not torch.equal(a, token_blocks(tok, texts, 64, 640, seed=2))
    with pytest.raises(UsageError, match="fewer than one block"):
        token_blocks(tok, ["short"], seq_len=64)
