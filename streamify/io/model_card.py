"""The artifact's README.md: a Hugging Face model card with front matter and the eval table."""

from __future__ import annotations

import yaml

_ROWS = (
    ("perplexity", "perplexity", "{:.3f}"),
    ("tokens", "tokens scored", "{:,}"),
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
    return rows


def render_model_card(manifest: dict, relation: str | None) -> str:
    """Model card text for an artifact described by ``manifest``."""
    source = manifest["source"]
    stage_names = [s["name"] for s in manifest["stages"]]
    front: dict = {}
    if source.get("base_model"):
        front["base_model"] = source["base_model"]
        if relation:
            front["base_model_relation"] = relation
    front["library_name"] = "transformers"
    front["tags"] = ["streamify", *stage_names]
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
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "# or, with streamify's runtime:",
        "import streamify",
        'model, tokenizer = streamify.load("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


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
