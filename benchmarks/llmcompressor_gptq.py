"""llm-compressor's GPTQ W4A16 on a local HF folder; prints one JSON line with its wall time.

Runs in its own virtual environment (llm-compressor pins older transformers and compressed-tensors);
``int4_quant.py`` creates that environment and calls this script:
    python llmcompressor_gptq.py MODEL_DIR CALIBRATION_JSON OUT_DIR GROUP_SIZE
CALIBRATION_JSON holds {"input_ids": [[...], ...]}, the same token blocks streamify calibrates on.
"""

import json
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, calibration, out_dir, group_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(calibration) as handle:
        ids = json.load(handle)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        dampening_frac=0.01,
    )
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=len(ids[0]), num_calibration_samples=len(ids))
    seconds = time.perf_counter() - started
    model.save_pretrained(out_dir, save_compressed=True)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
