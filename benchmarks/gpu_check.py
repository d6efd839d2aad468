"""GPU check: streamify's stages and runtime on a GPU against the CPU path, with decode speed and GPU memory.

Usage, on a machine with a GPU (torch, transformers, peft and accelerate installed; no network needed):
    make gpu-wheels      # here, with network: the other wheels the check needs (12 MB), into gpu_wheels/
    # there, in a copy of the repository with gpu_wheels/ in it:
    pip install --no-index --no-deps --find-links gpu_wheels -r benchmarks/gpu_requirements.txt
    PYTHONPATH=. python benchmarks/gpu_check.py [--device cuda] [--json gpu_check.json]
(``--device cpu`` runs the same checks with the CPU as the device: a dry run of the script itself.)

Checks, each against the same work on the CPU in the same run, with the tolerance it states:
- every stage on a tiny random Llama (recipes run by the pipeline with ``device: cuda``): dtype conversion,
  streaming conversion with LoRA healing, depth pruning with healing, INT4 (RTN, GPTQ; compressed-tensors
  and GGUF), entropy coding; the artifacts' tensors compared with the CPU run's;
- streaming equivalence on the device: the chunked bounded cache against the masked full forward;
- SmolLM2-135M's architecture (its published config, random weights: its 94 MB wheel does not travel to a
  machine that takes 64 MiB): streaming decode tokens/s (fp32 and bf16, and with the INT4 KV cache) beside
  full attention with transformers' cache, the decode logits against the CPU's, peak GPU memory.
TF32 is off, so fp32 matmuls on the GPU round as fp32 does. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerFast

from streamify.data.pydoc import pydoc_texts
from streamify.pipeline.recipe import Recipe
from streamify.pipeline.runner import run_recipe
from streamify.runtime import enable_streaming, make_spec, new_cache

SMOLLM2 = {  # SmolLM2-135M's config.json (architecture only)
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}
TINY |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384, "max_position_embeddings": 2048}
HEAL = {"steps": 4, "seq_len": 64, "grad_accum": 2, "warmup_steps": 1, "eval_blocks": 1}
# recipe stages and the tolerance of their artifacts against the CPU run's: max |difference| / max |value| of
# float tensors; integer tensors (INT4 codes) as the fraction that differ
STAGES = {
    "convert.dtype bf16": ([{"convert.dtype": {"dtype": "bf16"}}], 0.0, 0.0),
    "convert.streaming + healing": ([{"convert.streaming": {"sinks": 2, "window": 16, "heal": HEAL}}], 1e-3, 0.0),
    "prune.depth + healing": ([{"prune.depth": {"remove": 1, "heal": HEAL}}], 1e-3, 0.0),
    "quantize.int4 rtn": ([{"quantize.int4": {"method": "rtn"}}], 1e-2, 1e-3),
    "quantize.int4 gptq": ([{"quantize.int4": {"method": "gptq", "samples": 8, "seq_len": 64}}], 5e-2, 2e-2),
    "quantize.int4 gptq gguf": (
        [{"quantize.int4": {"method": "gptq", "samples": 8, "seq_len": 64, "weights_format": "gguf"}}],
        None,  # GGUF blocks are bytes: the fraction that differ, as INT4 codes
        2e-2,
    ),
    "quantize.entropy": ([{"quantize.entropy": {}}], 0.0, 0.0),
}


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama with a 384-token BPE tokenizer trained on builtin:pydoc, saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"], initial_alphabet=alphabet)
    tok.train_from_iterator(pydoc_texts("train")[:200], trainer)
    torch.manual_seed(0)
    config = dict(TINY)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config, eos_token_id=0))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return found


def compare(cpu: Path, gpu: Path) -> dict:
    """Float tensors: max |difference| / max |value|; others: the fraction of elements that differ."""
    ours, theirs = tensors(cpu), tensors(gpu)
    if ours.keys() != theirs.keys():
        return {"error": f"tensor names differ: {sorted(ours.keys() ^ theirs.keys())[:5]}"}
    float_gap, int_gap = 0.0, 0.0
    for name, value in ours.items():
        other = theirs[name]
        if value.is_floating_point():
            scale = value.float().abs().max().item() or 1.0
            float_gap = max(float_gap, (value.float() - other.float()).abs().max().item() / scale)
        else:
            int_gap = max(int_gap, (value != other).float().mean().item())
    files = [p.read_bytes() for p in (cpu / "model.gguf", gpu / "model.gguf") if p.is_file()]
    if len(files) == 2:  # GGUF blocks: the fraction of bytes that differ (sizes must be equal)
        if len(files[0]) != len(files[1]):
            return {"error": f"GGUF sizes differ: {len(files[0])} and {len(files[1])} bytes"}
        int_gap = sum(a != b for a, b in zip(*files, strict=True)) / len(files[0])
    return {"float_gap": float_gap, "int_gap": int_gap}


def check_stages(device: str, folder: Path) -> list[dict]:
    """Each recipe of :data:`STAGES` on the CPU and on ``device``; their artifacts compared."""
    source = tiny_model(folder / "tiny")
    rows = []
    for name, (stages, float_tol, int_tol) in STAGES.items():
        outputs = {}
        started = time.perf_counter()
        for where in ("cpu", device):
            recipe = Recipe(model=str(source), output=str(folder / f"{name}-{where}"), device=where, stages=stages)
            run_recipe(recipe, overwrite=True, use_cache=False)
            outputs[where] = Path(recipe.output)
        found = compare(outputs["cpu"], outputs[device])
        passed = "error" not in found and found["int_gap"] <= int_tol
        if float_tol is not None:
            passed = passed and found["float_gap"] <= float_tol
        tolerance = {"float_gap": float_tol, "int_gap": int_tol}
        seconds = round(time.perf_counter() - started, 1)
        rows.append({"check": name, **found, "tolerance": tolerance, "passed": passed, "seconds": seconds})
    return rows


@torch.inference_mode()
def check_equivalence(device: str, folder: Path) -> dict:
    """On ``device``: chunks of 1 and 7 through the bounded cache give the masked full forward's logits."""
    model = AutoModelForCausalLM.from_pretrained(folder / "tiny", dtype=torch.float32).to(device).eval()
    enable_streaming(model, make_spec(3, 8, "1,2", model.config.num_hidden_layers))
    ids = torch.randint(1, 384, (1, 3 + 8 * 20), generator=torch.Generator().manual_seed(1)).to(device)
    reference = model(ids).logits
    gap = 0.0
    for chunk in (1, 7):
        cache = new_cache(model)
        steps = range(0, ids.shape[1], chunk)
        pieces = [model(ids[:, i : i + chunk], past_key_values=cache, use_cache=True).logits for i in steps]
        gap = max(gap, ((torch.cat(pieces, 1) - reference).abs().max() / reference.abs().max()).item())
    return {"check": "streaming cache = masked forward", "gap": gap, "tolerance": 1e-5, "passed": gap <= 1e-5}


def smollm2_like(device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = dict(SMOLLM2)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(config).to(dtype).to(device).eval()


@torch.inference_mode()
def decode(model, ids: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
    """Feed ``ids`` one token at a time; the logits of every step and the tokens per second."""
    out = []
    synchronize(ids.device)
    started = time.perf_counter()
    for i in range(ids.shape[1]):
        out.append(model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    synchronize(ids.device)
    return torch.stack(out, 1), ids.shape[1] / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_decode(device: str, tokens: int) -> list[dict]:
    """SmolLM2-size streaming decode on ``device``: tokens/s beside full attention, logits against the CPU's."""
    rows = []
    ids = torch.randint(0, SMOLLM2["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    spec = make_spec(4, 256, "none", SMOLLM2["num_hidden_layers"])
    cpu = smollm2_like("cpu", torch.float32)
    enable_streaming(cpu, spec)
    cpu_logits, _ = decode(cpu, ids[:, :32], new_cache(cpu))
    del cpu
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = smollm2_like(device, dtype)
        run = ids.to(device)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, full_rate = decode(model, run, DynamicCache(config=model.config))
        enable_streaming(model, spec)
        for kv_bits in (None, 4):
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            logits, rate = decode(model, run, new_cache(model, kv_bits))
            row = {"check": f"decode {name}" + (" int4 kv" if kv_bits else ""), "tokens": tokens}
            row |= {"tokens_per_s": round(rate, 1), "full_attention_tokens_per_s": round(full_rate, 1)}
            if torch.device(device).type == "cuda":
                row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
            if dtype == torch.float32 and kv_bits is None:
                first = logits[:, :32].float().cpu()
                row["logit_gap_vs_cpu"] = ((first - cpu_logits).abs().max() / cpu_logits.abs().max()).item()
                row["tolerance"] = 1e-4
                row["passed"] = row["logit_gap_vs_cpu"] <= 1e-4
            rows.append(row)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens decoded one by one at SmolLM2's size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    environment = {"device": args.device, "torch": torch.__version__}
    if torch.device(args.device).type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(args.device)
    print(json.dumps(environment), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in [*check_stages(args.device, Path(tmp)), check_equivalence(args.device, Path(tmp))]:
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in check_decode(args.device, args.tokens):
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "checks": rows}, indent=2))
    failed = [row["check"] for row in rows if row.get("passed") is False]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; failed: {failed}" if failed else ""))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
