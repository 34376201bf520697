"""Human-readable tables next to the JSON results."""

from __future__ import annotations

from typing import Any, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable in a terminal, renders on GitHub)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4g}"
    return "" if value is None else str(value)


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def ppl_rows(results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One row per (label, perplexity result) with every sparsity statistic."""
    rows = []
    for label, r in results:
        s = r.get("sparsity") or {}
        rows.append(
            [label, r["ppl"], pct(s.get("module_sparsity", 0.0)), pct(s.get("param_ratio", 0.0)),
             pct(s.get("attn_sparsity", 0.0)), pct(s.get("mlp_sparsity", 0.0)), r["scored_tokens"], f"{r['wall_s']:.0f} s"]
        )
    return table(["model", "PPL", "module sparsity", "param ratio", "attn skip", "MLP skip", "tokens scored", "eval time"], rows)
