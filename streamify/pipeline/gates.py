"""Quality gates: compare eval results (and the source's) against limits after a run."""

from __future__ import annotations

from streamify.errors import GateError
from streamify.pipeline.recipe import Gates


def gate_values(report: dict | None, source: dict | None, source_size: int | None) -> dict[str, float]:
    """The value each gate checks, from the artifact's eval report, the source's and the source's size."""
    if report is None:
        return {}
    values = {
        "max_perplexity": report.get("perplexity"),
        "max_size_bytes": report.get("size_bytes"),
        "max_equivalence_abs_diff": report.get("equivalence.max_abs_diff"),
    }
    if source_size and report.get("size_bytes") is not None:
        values["min_size_reduction_pct"] = 100 * (1 - report["size_bytes"] / source_size)
    if source and source.get("perplexity") and report.get("perplexity"):
        values["max_perplexity_increase_pct"] = 100 * (report["perplexity"] / source["perplexity"] - 1)
    if source and source.get("stream.perplexity") and report.get("stream.perplexity"):
        values["max_stream_perplexity_ratio"] = report["stream.perplexity"] / source["stream.perplexity"]
    return {k: v for k, v in values.items() if v is not None}


def check_gates(
    gates: Gates | None, report: dict | None, source: dict | None, source_size: int | None = None
) -> list[dict]:
    """One result per set gate: ``{gate, limit, value, passed, rule}``; ``min_`` gates are lower limits."""
    if gates is None:
        return []
    values = gate_values(report, source, source_size)
    results = []
    for gate, limit in gates.model_dump(exclude_none=True).items():
        value = values.get(gate)
        if value is None:
            raise GateError(
                f"gate {gate}: no value to check (the eval did not produce it)",
                "enable the eval the gate needs (see `streamify recipe schema`), or remove the gate",
            )
        lower = gate.startswith("min_")
        passed = value >= limit if lower else value <= limit
        results.append(
            {"gate": gate, "limit": limit, "value": value, "passed": passed, "rule": ">=" if lower else "<="}
        )
    return results


def raise_on_failure(results: list[dict], artifact: str, summary: dict | None = None) -> None:
    """Raise :class:`GateError` (exit 5) naming every failed gate and by how much, carrying the run's ``summary``."""
    failed = [r for r in results if not r["passed"]]
    if failed:
        text = "; ".join(
            f"{r['gate']}: {r['value']:.4g} is not {r['rule']} {r['limit']} (off by {abs(r['value'] - r['limit']):.4g})"
            for r in failed
        )
        raise GateError(
            f"quality gate failed: {text}",
            f"the artifact {artifact} was written with the gate results in streamify.json; "
            "loosen the gate or change the recipe",
            result=summary,
        )
