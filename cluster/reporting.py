"""How benchmarks report: a fixed-width table on stdout and the whole report as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def text_table(rows: list[dict], cols: list[str], head: list[str], width: int) -> str:
    """Fixed-width columns; missing values print as '-'."""
    lines = ["  ".join(f"{h:>{width}}" for h in head)]
    for r in rows:
        lines.append("  ".join(f"{_fmt(r.get(c)):>{width}}" for c in cols))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def percentile(values: list[float], q: float) -> float | None:
    """The value at quantile q of `values` (nearest rank from below; None when empty)."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def write_report(report: dict, table: str, out: str) -> None:
    """Print the table and write the report as JSON."""
    print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
