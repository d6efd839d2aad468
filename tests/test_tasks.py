"""`streamify eval --tasks`: lm-eval task scores of the loaded model, on a task defined in local files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: run make test")

QUESTIONS = [
    ("def add(a, b):\n    return a", ["+ b", "* 7 ^", ") ("], 0),
    ("import os\nprint(os.path", [".join('a', 'b'))", "!!!", "3 ("], 0),
    ("for i in range(10):\n    print(", ["i)", "))))", "for"], 1),
    ("class Foo:\n    def __init__(self", ["):", "}}}", "9 9"], 0),
    ("x = [1, 2, 3]\ny = len(", ["x)", "]]", "def"], 2),
    ("with open(path) as f:\n    data = f", [".read()", "[[", "+-"], 0),
]


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice task ``tiny_mc`` on a local JSON-lines file, as lm-eval users define their own."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


@torch.no_grad()
def _accuracy(folder) -> float:
    """Multiple-choice accuracy computed with plain transformers: the choice whose tokens, after the question
    and lm-eval's default target delimiter (a space), have the highest summed log-probability."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    right = 0
    for question, choices, answer in QUESTIONS:
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(f"{question} {choice}", add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
            targets = torch.tensor(whole[1:])
            scores.append(logprobs[len(context) - 1 :].gather(1, targets[len(context) - 1 :, None]).sum().item())
        right += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return right / len(QUESTIONS)


def test_tasks_score_the_loaded_model_as_plain_transformers_does(cli, tiny_llama, tokenizer_dir, task_dir, tmp_path):
    other = build_tiny("llama", tokenizer_dir, tmp_path / "other", seed=2)  # 2 of 6 right, against 3 of 6
    args = ["--tasks", "tiny_mc", "--tasks-path", task_dir, "--max-tokens", "128", "--seq-len", "64"]
    result = cli("eval", tiny_llama, *args, "--vs", other, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["tasks.tiny_mc.acc"] == pytest.approx(_accuracy(tiny_llama))
    assert data["vs"]["tasks.tiny_mc.acc"] == pytest.approx(_accuracy(other))
    assert data["model"]["tasks.tiny_mc.acc"] != data["vs"]["tasks.tiny_mc.acc"]  # so a swap would show
    assert data["model"]["tasks.tiny_mc.sample_len"] == len(QUESTIONS)
    assert data["ratio"]["tasks.tiny_mc.acc"] == pytest.approx(
        data["model"]["tasks.tiny_mc.acc"] / data["vs"]["tasks.tiny_mc.acc"]
    )
    assert "perplexity" in data["model"]  # the kind's own measure still runs
    assert "Running" not in result.stderr and "loglikelihood" not in result.stderr  # no harness bars in a pipe


def test_unknown_task_and_missing_folder_are_clear_errors(cli, tiny_llama, task_dir, tmp_path):
    result = cli("eval", tiny_llama, "--tasks", "tiny_mcq", "--tasks-path", task_dir)
    assert result.exit_code == 2 and "no task 'tiny_mcq'" in result.stderr
    result = cli("eval", tiny_llama, "--tasks", "tiny_mc", "--tasks-path", tmp_path / "nope")
    assert result.exit_code == 3 and "nope: no such folder" in result.stderr
