"""`specserve report` from benchmark JSON files (no cluster: the files are written here)."""

from __future__ import annotations

import json
from pathlib import Path

from specserve.cluster.cli import main
from specserve.cluster.report import SOURCES

SERVING = {"config": {"levels": [1, 4], "requests": 2, "max_tokens": 8, "rounds": 1},
           "rows": [{"variant": v, "concurrency": c, "speedup": s, "tokens_per_s": 10 * s, "failed": 0,
                     "ttft_ms": [5.0, 7.5, 9.0], "itl_ms": [1.0, 1.2]}
                    for v, c, s in [("plain", 1, 1.0), ("plain", 4, 1.0), ("pipelined", 1, 1.3),
                                    ("pipelined", 4, 0.8)]]}
DISTILL = {"config": {"window": 100},
           "summary": {"acceptance_before": 0.35, "acceptance_after": 0.5},
           "rows": [{"phase": p, "served": 100 * (i + 1), "acceptance_rate": a, "tokens_per_s": 100.0 + i,
                     "live_version": "demo-v0", "train_steps": 10 * i, "failed": 0}
                    for i, (p, a) in enumerate([("before", 0.35), ("training", 0.42), ("after", 0.5)])]}
FAULTS = {"rows": [{"fault": "kill_drafter", "sent": 40, "completed": 40, "failed_by_code": {},
                    "changed_outputs": 0}]}


def test_report_plots_what_was_measured_and_names_the_command_for_what_was_not(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "bench_serving.json").write_text(json.dumps(SERVING))
    (runs / "bench_faults.json").write_text(json.dumps(FAULTS))
    (runs / "bench_distill.json").write_text(json.dumps(DISTILL))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert (out / "speedup_vs_concurrency.png").stat().st_size > 1000
    assert (out / "latency_distributions.png").stat().st_size > 1000
    assert "| pipelined | 1.300 |" not in text and "| 4 | pipelined |" in text  # rows by concurrency, variant
    assert "| kill_drafter | 40 | 40 |" in text
    assert f"`{SOURCES['overload'][1]}` writes `runs/bench_overload.json`" in text
    assert f"`{SOURCES['fuzz'][1]}`" in text
    assert (out / "acceptance_over_time.png").stat().st_size > 1000
    assert "| 0.350 | 0.500 |" in text and "| training | 200 | 0.420 |" in text
