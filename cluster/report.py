"""`specserve report`: one markdown report with plots, from the benchmarks' JSON files.

Every benchmark prints its table and writes JSON into runs/ (see README); this command reads
what is there and writes `REPORT.md` with PNG plots beside it: speedup against concurrency and
latency distributions (bench --serving), acceptance and tokens/s over requests served while
distilling (bench --distill), and the tables of the fault suite (bench --faults), the overload
run (bench --overload) and the fuzzing campaign. A section whose JSON is missing names the
command that produces it; `make report` runs them all, then this.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SOURCES = {
    "serving": ("bench_serving.json", "specserve bench --serving"),
    "distill": ("bench_distill.json", "specserve bench --distill"),
    "faults": ("bench_faults.json", "specserve bench --faults"),
    "overload": ("bench_overload.json", "specserve bench --overload"),
    "fuzz": ("fuzz.json", "SPECSERVE_FUZZ_EXAMPLES=10000 pytest tests/cluster/test_hardening.py -k fuzz"),
}


def _load(runs: Path, key: str) -> dict | None:
    path = runs / SOURCES[key][0]
    return json.loads(path.read_text()) if path.exists() else None


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list):
        return f"{len(v)} values"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """A markdown table of `rows` (columns: `cols`, or every key in first-seen order)."""
    if not rows:
        return "(no rows)\n"
    if cols is None:
        cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], list)))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _missing(key: str) -> str:
    name, command = SOURCES[key]
    return f"Not measured yet: `{command}` writes `runs/{name}`.\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def serving_section(data: dict, out: Path) -> str:
    """Speedup against concurrency, TTFT and inter-token latency distributions."""
    plt = _plt()
    rows = data["rows"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        pts = sorted((r["concurrency"], r["speedup"]) for r in rows if r["variant"] == v and r.get("speedup"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s relative to plain decoding",
           title="Speedup against concurrency")
    ax.set_xticks(levels, [str(x) for x in levels])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_concurrency.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft", "Time to first token"), (axes[1], "itl", "Inter-token latency")):
        samples, labels = [], []
        for level in levels:
            for v in variants:
                row = next((r for r in rows if r["variant"] == v and r["concurrency"] == level), None)
                if row and row.get(f"{key}_ms"):
                    samples.append(row[f"{key}_ms"])
                    labels.append(f"{v}\n@{level}")
        if samples:
            ax.boxplot(samples, showfliers=True)
            ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=6, rotation=90)
        ax.set(ylabel="ms", title=title, yscale="log")
    fig.tight_layout()
    fig.savefig(out / "latency_distributions.png", dpi=120)
    plt.close(fig)
    cfg = data.get("config", {})
    cols = ["concurrency", "variant", "tokens_per_s", "speedup", "acceptance_rate", "ttft_p50_ms", "ttft_p90_ms",
            "itl_p50_ms", "itl_p90_ms", "failed", "matches_plain"]
    return (f"Demo pair through gRPC; {cfg.get('requests')} requests per level and round, "
            f"{cfg.get('max_tokens')} tokens each, {cfg.get('rounds')} rounds with variants interleaved.\n\n"
            "![speedup](speedup_vs_concurrency.png)\n\n![latency](latency_distributions.png)\n\n"
            + markdown_table(rows, cols))


def distill_section(data: dict, out: Path) -> str:
    """Acceptance and tokens/s against requests served, before, while and after training."""
    plt = _plt()
    rows = data["rows"]
    xs = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [r["acceptance_rate"] for r in rows], marker="o", color="tab:blue")
    ax.set(xlabel=f"window ({data['config'].get('window')} requests each)", ylabel="acceptance rate",
           title="Acceptance while distilling (shifted workload)")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["tokens_per_s"] for r in rows], marker=".", color="tab:orange")
    ax2.set_ylabel("tokens/s", color="tab:orange")
    fig.tight_layout()
    fig.savefig(out / "acceptance_over_time.png", dpi=120)
    plt.close(fig)
    summary = data.get("summary", {})
    return ("![acceptance](acceptance_over_time.png)\n\n" + markdown_table([summary]) + "\n"
            + markdown_table(rows, ["phase", "served", "acceptance_rate", "tokens_per_s", "live_version",
                                    "train_steps", "failed"]))


def table_section(data: dict) -> str:
    """A benchmark's rows (and summary, if any) as tables."""
    text = ""
    if data.get("summary"):
        text += markdown_table([data["summary"]]) + "\n"
    for key, value in data.items():  # rows and other short lists of records (memory per process, not samples)
        if isinstance(value, list) and 0 < len(value) <= 40 and all(isinstance(r, dict) for r in value):
            text += ("" if key == "rows" else f"{key}:\n\n") + markdown_table(value) + "\n"
    for key, value in data.items():  # counts such as requests by status
        if key not in ("summary", "config") and isinstance(value, dict) and value and \
                all(isinstance(v, (int, float)) for v in value.values()):
            text += f"{key}:\n\n" + markdown_table([value]) + "\n"
    return text or markdown_table([{k: v for k, v in data.items() if not isinstance(v, (dict, list))}])


def write_report(runs: Path, out: Path) -> Path:
    """REPORT.md (and its PNGs) in `out` from the JSON files in `runs`; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# specserve benchmark report\n\nBuilt {time.strftime('%Y-%m-%d %H:%M')} from `{runs}` by "
             "`specserve report`. Every figure is a measurement of the run named in its section.\n"]
    sections = [("Speedup and latency (served through gRPC)", "serving", lambda d: serving_section(d, out)),
                ("Acceptance over time under online distillation", "distill", lambda d: distill_section(d, out)),
                ("Fault injection under load", "faults", table_section),
                ("Overload", "overload", table_section),
                ("Bad input (fuzzing)", "fuzz", table_section)]
    for title, key, render in sections:
        data = _load(runs, key)
        parts.append(f"## {title}\n\n" + (render(data) if data is not None else _missing(key)))
    path = out / "REPORT.md"
    path.write_text("\n".join(parts))
    return path


def report_main(args) -> int:
    path = write_report(Path(args.runs), Path(args.out))
    print(path.read_text())
    print(f"wrote {path}")
    return 0
