"""The artifact's README.md: a Hugging Face model card with front matter, the eval table and how to run it.

The "Use" section and the front matter follow what the folder holds: a GGUF
file (llama.cpp, llama-cpp-python, transformers with ``gguf_file=``), an
entropy-coded container (streamify only, or decoded back to safetensors), or
transformers files (plain, streaming, INT4 compressed-tensors).
"""

from __future__ import annotations

from pathlib import Path

import yaml

PLACEHOLDER = "path/to/this/folder"  # what the snippets call the artifact folder

_ROWS = (
    ("perplexity", "perplexity", "{:.3f}"),
    ("tokens", "tokens scored", "{:,}"),
    ("wer", "word error rate", "{:.4f}"),
    ("clips", "clips transcribed", "{:,}"),
    ("denoising_loss", "denoising loss (flow matching)", "{:.5f}"),
    ("samples", "samples denoised", "{:,}"),
    ("embeddings", "windows embedded", "{:,}"),
    ("cosine_to_reference_mean", "cosine to the source, mean", "{:.6f}"),
    ("cosine_to_reference_min", "cosine to the source, min", "{:.6f}"),
    ("relative_error_to_reference", "relative error to the source", "{:.3e}"),
    ("params", "parameters", "{:,}"),
    ("size_bytes", "weights on disk (bytes)", "{:,}"),
    ("bits_per_weight", "bits per weight", "{:.2f}"),
    ("load_seconds", "load time (s)", "{:.2f}"),
    ("stream.perplexity", "stream perplexity", "{:.3f}"),
    ("stream.tokens", "stream tokens", "{:,}"),
    ("stream.cache_bytes_max", "stream cache, max (bytes)", "{:,}"),
    ("stream.latency_ms_first_10pct", "ms/token, first 10% of stream", "{:.2f}"),
    ("stream.latency_ms_last_10pct", "ms/token, last 10% of stream", "{:.2f}"),
)


def eval_rows(report: dict, source: dict | None) -> list[tuple[str, str, str, str]]:
    """(key, label, artifact value, source value) rows for the eval table; '' where missing."""
    rows = []
    for key, label, fmt in _ROWS:
        value = report.get(key)
        if value is None:
            continue
        before = source.get(key) if source else None
        rows.append((key, label, fmt.format(value), fmt.format(before) if before is not None else ""))
    for key in sorted(k for k in report if k.startswith("tasks.")):  # lm-eval's metrics, by their own names
        fmt = "{:,}" if isinstance(report[key], int) else "{:.4f}"
        before = source.get(key) if source else None
        rows.append((key, key.removeprefix("tasks."), fmt.format(report[key]), fmt.format(before) if before else ""))
    return rows


def render_model_card(manifest: dict, relation: str | None, folder: Path) -> str:
    """Model card text for the artifact in ``folder``, described by ``manifest``."""
    source = manifest["source"]
    stage_names = [s["name"] for s in manifest["stages"]]
    gguf = next(iter(sorted(folder.glob("*.gguf"))), None)
    front: dict = {}
    if source.get("base_model"):
        front["base_model"] = source["base_model"]
        if relation:
            front["base_model_relation"] = relation
    if gguf is None:  # a GGUF file is recognised by the Hub from the file itself, with these tags
        front["library_name"] = "transformers"
    front["tags"] = ["streamify", *stage_names, *(["gguf", "llama-cpp"] if gguf else [])]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {source['spec']} — streamify artifact", ""]
    lines += [f"Made by streamify {manifest['streamify_version']} from `{source['spec']}`"]
    for f in source["files"]:
        lines.append(f"- source file `{f['path'].rsplit('/', 1)[-1]}`, sha256 `{f['sha256']}`")
    lines += ["", "## Stages", ""]
    for stage in manifest["stages"] or [{"name": "(none: re-export only)", "params": {}}]:
        params = ", ".join(f"{k}={v}" for k, v in stage["params"].items())
        lines.append(f"- `{stage['name']}` {params}")
    for stage in manifest["stages"]:
        if stage.get("metrics", {}).get("scores"):
            lines += _scores_section(stage["metrics"])
    if manifest["streaming"]:
        lines += _streaming_section(manifest["streaming"])
    if manifest["eval"]:
        lines += _eval_section(manifest)
    lines += ["", "## Use", "", *_use_section(folder, gguf), ""]
    return "\n".join(lines)


def _use_section(folder: Path, gguf: Path | None) -> list[str]:
    """How to run what ``folder`` holds, as snippets that run when PLACEHOLDER is the folder."""
    streamify_load = ["import streamify", f'model, tokenizer = streamify.load("{PLACEHOLDER}")']
    if gguf is not None:
        return [
            "With llama.cpp:",
            "",
            "```bash",
            f'llama-cli -m {PLACEHOLDER}/{gguf.name} -p "The capital of France is" -n 32',
            "```",
            "",
            "With llama-cpp-python, transformers (which dequantizes the GGUF to floats) or streamify:",
            "",
            "```python",
            "from llama_cpp import Llama",
            f'llm = Llama(model_path="{PLACEHOLDER}/{gguf.name}")',
            'print(llm("The capital of France is", max_tokens=16)["choices"][0]["text"])',
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{PLACEHOLDER}", gguf_file="{gguf.name}")',
            *streamify_load,
            "```",
        ]
    if any(folder.glob("*.entropy.safetensors")):
        return [
            "The weights are entropy-coded (lossless); streamify decodes them as it loads:",
            "",
            "```python",
            *streamify_load,
            "```",
            "",
            "For other runtimes, decode them back to the original safetensors files first:",
            "",
            "```bash",
            f"streamify quantize decode {PLACEHOLDER} -o {PLACEHOLDER}-decoded",
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{PLACEHOLDER}")',
        "# or, with streamify's runtime:",
        *streamify_load,
        "```",
    ]


def _scores_section(metrics: dict) -> list[str]:
    tables = {k: v for k, v in metrics["scores"].items() if isinstance(v, list)}
    lines = ["", "## Block scores", "", f"Removed blocks: {', '.join(map(str, metrics.get('removed', [])))}", ""]
    lines += ["| block | " + " | ".join(tables) + " |", "|---|" + "---|" * len(tables)]
    for index in range(len(next(iter(tables.values())))):
        cells = [f"{v[index]:.4f}" if v[index] is not None else "-" for v in tables.values()]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    return lines


def _streaming_section(streaming: dict) -> list[str]:
    full = streaming.get("full_layers") or []
    lines = [
        "",
        "## Streaming",
        "",
        f"- attention sinks: {streaming['sinks']} tokens; window: {streaming['window']} most recent tokens",
        f"- full-attention layers: {', '.join(map(str, full)) if full else 'none'}; "
        f"the other {len(streaming['layer_types']) - len(full)} keep a bounded cache",
        f"- architecture written: {streaming.get('architecture', '?')} "
        f"(export: {streaming.get('export_arch', 'same')})",
    ]
    if streaming.get("native_note"):
        lines.append(f"- note: {streaming['native_note']}")
        check = streaming.get("native_check")
        if check:
            lines.append(
                f"- measured: plain transformers runs this export at perplexity {check['perplexity']:.3f} over "
                f"{check['tokens']:,} held-out tokens of `{check['data']}` (one sequence), against "
                f"{check['full_attention_perplexity']:.3f} for the source with full attention: "
                f"ratio {check['ratio']:.3f}"
            )
        else:
            lines.append("- measured: not measured (native_check_tokens 0)")
    else:
        lines.append("- plain transformers runs this model with full attention; streamify.load() makes it stream")
    return lines


def _eval_section(manifest: dict) -> list[str]:
    report = manifest["eval"]
    where = f"`{report.get('data')}`, windows of {report.get('seq_len')} tokens" if report.get("data") else ""
    lines = ["", "## Evaluation", "", where, "", "| metric | this model | source |", "|---|---|---|"]
    lines += [
        f"| {label} | {value} | {before} |"
        for _, label, value, before in eval_rows(report, manifest.get("eval_source"))
    ]
    for gate in manifest["gates"]:
        status = "passed" if gate["passed"] else "FAILED"
        rule = "≥" if gate.get("rule") == ">=" else "≤"
        lines.append(f"\nGate `{gate['gate']}` {rule} {gate['limit']}: {gate['value']:.4g} ({status})")
    return lines
