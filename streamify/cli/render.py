"""Human renderings of command results (the JSON output carries the same data)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from streamify.io.model_card import eval_rows
from streamify.units import human_bytes


def render_inspect(console: Console, data: dict) -> None:
    """Model facts as a two-column table, then the stages that apply."""
    table = Table(title=data["model"], show_header=False)
    dtypes = ", ".join(f"{k}×{v}" for k, v in data["dtypes"].items())
    rows = [
        ("path", data["path"]),
        ("format", data["format"]),
        ("architecture", f"{data['architecture']} ({data['model_type']})"),
        ("kind", data["kind"] or "none streamify handles"),
        ("parameters", f"{data['params']:,}"),
        ("blocks", f"{data['blocks']} at {data['block_path']}"),
        ("attention", data["attention_summary"] or "-"),
        ("stored dtypes", dtypes),
        ("size", f"{human_bytes(data['size_bytes'])} ({data['bits_per_weight']:.2f} bits/weight)"),
        (
            "streamify artifact",
            ", ".join(data["stages_applied"]) or "yes" if data["streamify_artifact"] else "no",
        ),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if data.get("entropy"):
        render_entropy(console, data["entropy"])
    console.print("stages that apply:")
    for name, summary in data["applicable_stages"].items():
        console.print(f"  {name:<18} {summary}", soft_wrap=True)
    if data.get("other_stages"):
        console.print("stages that do not apply:")
        for name, why in data["other_stages"].items():
            console.print(f"  {name:<18} {why}", soft_wrap=True)


def render_entropy(console: Console, summary: dict) -> None:
    """Stored vs raw size per tensor group of an entropy-coded artifact."""
    table = Table(title=f"entropy-coded: {summary['ratio']:.2%} of the raw size overall")
    for column in ("tensor group", "raw", "stored", "ratio"):
        table.add_column(column, justify="left" if column == "tensor group" else "right")
    for group, sizes in summary["groups"].items():
        table.add_row(
            group, human_bytes(sizes["raw_bytes"]), human_bytes(sizes["stored_bytes"]), f"{sizes['ratio']:.2%}"
        )
    console.print(table)


def render_eval_table(console: Console, report: dict, source: dict | None, title: str, other: str = "source") -> None:
    """Eval metrics; with a second report, its column (headed ``other``) and the ratio."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("model", justify="right")
    if source:
        table.add_column(other, justify="right")
        table.add_column("ratio", justify="right")
    for key, label, value, before in eval_rows(report, source):
        if source:
            ratio = report[key] / source[key] if source.get(key) else None
            table.add_row(label, value, before, f"{ratio:.4f}" if ratio is not None else "")
        else:
            table.add_row(label, value)
    console.print(table)


def render_run(console: Console, data: dict) -> None:
    """A plan (dry run) or a finished run's eval table, gates and artifact path."""
    if data.get("dry_run"):
        render_plan(console, data["plan"])
        return
    if "process" in data:  # a process other than the main one under a launcher
        console.print(
            f"process {data['process']} of {data['processes']}: ran {', '.join(data['stages_run']) or 'no stages'} "
            "for its share of the training; the main process writes the artifact"
        )
        return
    for stage in data["stages"]:
        console.print(f"stage {stage['name']}: {stage['seconds']:.1f} s {_scalars(stage['metrics'])}")
        if stage["metrics"].get("scores"):
            render_scores(console, stage["metrics"]["scores"], stage["metrics"].get("removed", []))
    if data["eval"]:
        render_eval_table(console, data["eval"], data["eval_source"], "eval (held-out)")
    for gate in data["gates"]:
        mark = "[green]passed[/green]" if gate["passed"] else "[red]FAILED[/red]"
        rule = "≥" if gate.get("rule") == ">=" else "≤"
        console.print(f"gate {gate['gate']} {rule} {gate['limit']}: {gate['value']:.4g} {mark}")
    console.print(f"artifact: {data['output']}")


def render_scores(console: Console, scores: dict, removed: list[int], width: int = 40) -> None:
    """Per-block scores as horizontal bars, one chart per metric; removed blocks are marked."""
    for metric, values in scores.items():
        if not isinstance(values, list):
            continue
        known = [v for v in values if v is not None]
        top = max(known, default=0) or 1.0
        console.print(f"block scores ({metric}; x = removed):")
        for index, value in enumerate(values):
            mark = "x" if index in removed else " "
            if value is None:
                console.print(f"  {index:>3} {mark} (not a candidate)")
                continue
            bar = "█" * max(1, round(width * value / top)) if value > 0 else ""
            console.print(f"  {index:>3} {mark} {bar:<{width}} {value:.4f}")


def _scalars(metrics: dict) -> str:
    """The plain-valued metrics as ``key=value`` (nested tables and long lists stay in the JSON output and
    manifest)."""
    shown = []
    for key, value in metrics.items():
        if isinstance(value, float):
            shown.append(f"{key}={value:.4g}")
        elif isinstance(value, int | str):
            shown.append(f"{key}={value}")
        elif isinstance(value, list) and len(value) <= 16:  # longer ones (loss curves) stay in the JSON
            shown.append(f"{key}={','.join(map(str, value))}")
    return " ".join(shown)


def render_plan(console: Console, plan: dict) -> None:
    """The plan of a run: model facts, stages with params, estimates."""
    console.print(
        f"[bold]plan[/bold] {plan['model']} ({plan['architecture']}, {plan['params']:,} params, "
        f"{plan['blocks']} blocks: {plan['attention']}) -> {plan['output']}"
    )
    for i, stage in enumerate(plan["stages"], 1):
        params = ", ".join(f"{k}={v}" for k, v in stage["params"].items())
        console.print(f"  {i}. {stage['name']} ({stage['summary']}): {params}", markup=False)
        if stage.get("resolved"):
            resolved = ", ".join(f"{k}={v}" for k, v in stage["resolved"].items())
            console.print(f"     resolved for this model: {resolved}", markup=False)
        est = stage["estimate"]
        console.print(
            f"     cache: {stage['cache']}; peak memory ~{human_bytes(est['peak_memory_bytes'])}, "
            f"output ~{human_bytes(est['disk_bytes'])}"
            + (f"; teacher: {stage['teacher']}" if "teacher" in stage else "")
            + (f"; holds {stage['holds']}" if "holds" in stage else "")
        )
        for key, matches in stage["modules"].items():
            if key == "lora_modules":
                console.print(f"     LoRA on {matches} linear modules")
                continue
            for pattern, hit in matches.items():
                console.print(
                    f"     {key} {pattern!r}: {hit['count']} modules (e.g. {', '.join(hit['examples'])})",
                    markup=False,
                )
    if not plan["stages"]:
        console.print("  (no stages: re-export only)")
    if plan["eval"]:
        ev = plan["eval"]
        stream = (
            f"; stream of {ev['stream_tokens']} tokens, {ev['stream_chunk']} a step" if ev.get("stream_tokens") else ""
        )
        console.print(f"  eval: {ev['data']}, {ev['max_tokens']} tokens in windows of {ev['seq_len']}{stream}")
    if plan["gates"]:
        console.print(f"  gates: {plan['gates']}")
    if plan["processes"]["count"] > 1:
        console.print(f"  processes: {plan['processes']['training']}")
    if plan["path"]["why"]:
        console.print(f"  weights: {plan['path']['why']}", markup=False)
    est = plan["estimate"]
    console.print(
        f"  estimate: peak memory ~{human_bytes(est['peak_memory_bytes'])} "
        f"(available {human_bytes(est['available_memory_bytes'])}), disk ~{human_bytes(est['disk_bytes'])}"
    )


def render_eval(console: Console, data: dict) -> None:
    """``streamify eval``: one model, or two side by side."""
    title = f"eval {data['model_spec']}" + (f" vs {data['vs_spec']}" if data.get("vs") else "")
    render_eval_table(console, data["model"], data.get("vs"), title, other="vs")


def _rows(console: Console, title: str, data: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in data.items():
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key, text)
    console.print(table)


def render_streaming_eval(console: Console, data: dict) -> None:
    """``streamify eval --stream`` / ``--check equivalence``."""
    if "stream" in data:
        _rows(console, f"stream {data['model_spec']}", data["stream"])
    if "equivalence" in data:
        _rows(console, f"equivalence {data['model_spec']}", data["equivalence"])


def render_stream(console: Console, data: dict) -> None:
    """``streamify stream``: the summary of the whole stream."""
    _rows(console, "stream", data)


def render_transcription(console: Console, data: dict) -> None:
    """``streamify transcribe``: the final text, the offline one if asked, latency, real-time factor, flicker."""
    console.print(data["text"].strip(), soft_wrap=True)
    if "offline_text" in data:
        console.print(f"offline: {data['offline_text'].strip()}", soft_wrap=True)
    latency = data["latency_ms_per_chunk"]
    console.print(
        f"{data['chunks']} chunks of {data['chunk_ms']} ms over {data['audio_seconds']:.2f} s: "
        f"{latency['median']:.1f} ms a chunk (p95 {latency['p95']:.1f}), real-time factor "
        f"{data['real_time_factor']:.3f}, flicker {data['flicker']:.3f}"
    )
