"""Quality gates: compare eval results against limits after a run."""

from __future__ import annotations

from streamify.errors import GateError
from streamify.pipeline.recipe import Gates


def check_gates(gates: Gates | None, report: dict | None, source: dict | None) -> list[dict]:
    """One result per set gate: ``{gate, limit, value, passed}`` (all values are "at most" limits)."""
    if gates is None:
        return []
    values = {}
    if report is not None:
        values["max_perplexity"] = report.get("perplexity")
        values["max_size_bytes"] = report.get("size_bytes")
        if source and source.get("perplexity") and report.get("perplexity"):
            values["max_perplexity_increase_pct"] = 100 * (report["perplexity"] / source["perplexity"] - 1)
        if source and source.get("stream.perplexity") and report.get("stream.perplexity"):
            values["max_stream_perplexity_ratio"] = report["stream.perplexity"] / source["stream.perplexity"]
    results = []
    for gate, limit in gates.model_dump(exclude_none=True).items():
        value = values.get(gate)
        if value is None:
            raise GateError(
                f"gate {gate}: no value to check (the eval did not produce it)",
                "enable eval in the recipe, or remove the gate",
            )
        results.append({"gate": gate, "limit": limit, "value": value, "passed": value <= limit})
    return results


def raise_on_failure(results: list[dict], artifact: str) -> None:
    """Raise :class:`GateError` (exit 5) naming every failed gate and by how much."""
    failed = [r for r in results if not r["passed"]]
    if failed:
        text = "; ".join(
            f"{r['gate']}: {r['value']:.4g} > {r['limit']} (over by {r['value'] - r['limit']:.4g})" for r in failed
        )
        raise GateError(
            f"quality gate failed: {text}",
            f"the artifact {artifact} was written with the gate results in streamify.json; "
            "loosen the gate or change the recipe",
        )
