"""Render specserve's Grafana dashboard from the panel list below, or check that it is fresh.

    .venv/bin/python deploy/grafana/render_dashboard.py          # rewrite specserve-dashboard.json
    .venv/bin/python deploy/grafana/render_dashboard.py --check  # exit 1 if it is stale

The JSON has the shape of the dashboards Ray generates for Serve (legacy `graph` panels,
schemaVersion 27, a two-column grid under collapsible rows) and the same variables: a
Prometheus `datasource`, `SessionName` and `Cluster` (the `ray_io_cluster` label KubeRay's
PodMonitor sets). Every query is filtered by both, as Ray's are.

Metric names are the ones Ray's metrics agent exports: `ray_` + the name given to
ray.util.metrics; counters end in `_total`; histograms export `_bucket`, `_sum` and `_count`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "specserve-dashboard.json"
PREFIX = "ray_specserve_"  # Ray prefixes every custom metric with "ray_"
FILTERS = 'SessionName=~"$SessionName",ray_io_cluster=~"$Cluster"'
WINDOW = "5m"  # rate window, as in Ray's Serve dashboard
PANEL_W, PANEL_H, COLUMNS = 12, 8, 2  # Ray's grid: 24 units wide, two panels a row


# ---------------------------------------------------------------- query helpers


def sel(metric: str) -> str:
    """`metric` (without the ray_specserve_ prefix) as a selector under the dashboard filters."""
    return f"{PREFIX}{metric}{{{FILTERS}}}"


def rate(metric: str, by: str = "") -> str:
    """Per-second rate of a counter (or a histogram's _sum/_count), summed over replicas."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({sel(metric)}[{WINDOW}]))"


def increase(metric: str) -> str:
    """How much a counter grew in the last rate window (for rare events: swaps, publishes)."""
    return f"sum (increase({sel(metric)}[{WINDOW}]))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({sel(histogram + '_bucket')}[{WINDOW}])))"


def mean(histogram: str) -> str:
    return f"{rate(histogram + '_sum')} / {rate(histogram + '_count')}"


def per_replica(expr: str) -> str:
    """`expr` summed per replica (one Ray worker process each), labelled by a short worker id."""
    summed = f"sum by (NodeAddress, WorkerId) ({expr})"
    return f'label_replace({summed}, "replica", "$1", "WorkerId", "(.{{8}}).*")'


# ---------------------------------------------------------------- panel list


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str  # a Grafana unit id: s, reqps, percentunit, short
    targets: tuple[Target, ...]
    stack: bool = False  # stack only series that add up to a meaningful total
    max: str | None = None  # y-axis maximum (ratios stop at 1)


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def quantiles(histogram: str, qs=(0.5, 0.95, 0.99)) -> tuple[Target, ...]:
    return tuple(Target(quantile(q, histogram), f"p{round(q * 100)}") for q in qs)


def ratio(title: str, description: str, *targets: Target) -> Panel:
    return Panel(title, description, "percentunit", targets, max="1")


SERVING = Row("Serving", (
    Panel("Requests/s by status", "Finished Generate calls per second, by status: ok, or the gRPC status code.", "reqps",
          (Target(rate("requests_total", by="status"), "{{status}}"),), stack=True),
    Panel("Generated tokens/s", "Tokens streamed to clients per second, all verifier replicas.", "short",
          (Target(rate("generated_tokens_total"), "tokens/s"),)),
    Panel("Time to first token", "From the request's arrival to its first streamed token.", "s",
          quantiles("ttft_seconds")),
    Panel("Inter-token latency", "Time between streamed chunks, divided by the tokens in the chunk.", "s",
          quantiles("inter_token_seconds")),
    Panel("End-to-end latency", "From the request's first byte in to its last byte out.", "s",
          quantiles("e2e_seconds")),
))

SPECULATION = Row("Speculation", (
    ratio("Acceptance rate per drafter version",
          "Accepted / draft tokens verified, per drafter weight version: the acceptance rate alpha.",
          Target(f'{rate("accepted_tokens_total", by="drafter_version")} / '
                 f'{rate("draft_tokens_total", by="drafter_version")}', "{{drafter_version}}")),
    Panel("Draft and accepted tokens/s", "Draft tokens verified and draft tokens accepted, per drafter version.",
          "short", (Target(rate("draft_tokens_total", by="drafter_version"), "draft {{drafter_version}}"),
                    Target(rate("accepted_tokens_total", by="drafter_version"), "accepted {{drafter_version}}"))),
    Panel("Accepted tokens by block position",
          "Accepted draft tokens per second by position in the draft block (1 = first). "
          "Each position can only be accepted when all before it were.", "short",
          (Target(rate("accepted_by_position_total", by="position"), "position {{position}}"),)),
    Panel("Tokens per sequence step",
          "Generated tokens / sequences verified (sum of batch sizes): tokens a sequence gains "
          "per verification forward. 1 means the drafts bring nothing.", "short",
          (Target(f'{rate("generated_tokens_total")} / {rate("verifier_batch_size_sum")}', "tokens per step"),)),
    Panel("Verifier batch size", "Sequences per verification step.", "short",
          (Target(mean("verifier_batch_size"), "mean"),) + quantiles("verifier_batch_size", (0.5, 0.99))),
    Panel("Verification steps/s", "Batched verification forwards per second, all verifier replicas.", "short",
          (Target(rate("verify_steps_total"), "steps/s"),)),
    Panel("Draft round trip", "Draft round trip minus drafting time: network and queues between a "
          "verifier and its drafters.", "s", quantiles("draft_round_trip_seconds", (0.5, 0.99))),
))

DRAFTERS = Row("Drafters", (
    Panel("Drafter pool size", "Drafter replicas registered, as the verifiers see them (max and min over "
          "verifier replicas), and drafter replicas reporting metrics.", "short",
          (Target(f'max ({sel("drafter_pool_size")})', "registered (max)"),
           Target(f'min ({sel("drafter_pool_size")})', "registered (min)"),
           Target(f'count ({sel("drafter_sequences")})', "reporting"))),
    Panel("Sequences per drafter replica", "Sequences each drafter replica holds (what its autoscaling "
          "follows).", "short",
          (Target(per_replica(sel("drafter_sequences")), "{{NodeAddress}} {{replica}}"),), stack=True),
    Panel("Drafts/s per drafter replica", "Drafts sent per second by each drafter replica.", "short",
          (Target(per_replica(f'rate({sel("drafter_drafts_total")}[{WINDOW}])'), "{{NodeAddress}} {{replica}}"),),
          stack=True),
    Panel("Drafter weight swaps", f"Hot swaps of drafter weights in the last {WINDOW}, all replicas.", "short",
          (Target(increase("drafter_weight_swaps_total"), "swaps"),)),
))

DISTILLATION = Row("Distillation", (
    ratio("Live acceptance per drafter version", "Acceptance rate per drafter version as the distill hub "
          "measures it on live traffic (what canary promotion and rollback compare).",
          Target(f'max by (drafter_version) ({sel("drafter_acceptance")})', "{{drafter_version}}")),
    ratio("Gate score", "Expected acceptance on held-out traffic at the latest gate, for the candidate and "
          "the live drafter.", Target(f'max by (model) ({sel("distill_gate_score")})', "{{model}}")),
    Panel("Training loss", "Distillation loss of the latest training round.", "short",
          (Target(f'max ({sel("distill_loss")})', "loss"),)),
    ratio("Replay buffer fill", "Fraction of the replay buffer holding traffic records.",
          Target(f'max ({sel("distill_buffer_fill")})', "fill")),
    Panel("Traffic records/s", "Records the hub receives from verifiers, and records dropped before "
          "training (tap full or expired).", "short",
          (Target(rate("distill_records_total"), "received"), Target(rate("distill_dropped_total"), "dropped"))),
    Panel("Publishes and rollbacks", f"Drafter versions published and rolled back in the last {WINDOW}.", "short",
          (Target(increase("distill_publishes_total"), "published"),
           Target(increase("distill_rollbacks_total"), "rolled back"))),
))

ROWS = (SERVING, SPECULATION, DRAFTERS, DISTILLATION)


# ---------------------------------------------------------------- JSON


def target_json(target: Target, ref_id: str) -> dict:
    return {"exemplar": True, "expr": target.expr, "interval": "", "legendFormat": target.legend,
            "refId": ref_id}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    """A Grafana graph panel laid out like the ones in Ray's generated dashboards."""
    return {
        "aliasColors": {}, "bars": False, "dashLength": 10, "dashes": False,
        "datasource": "${datasource}",
        "description": panel.description,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "fill": 10 if panel.stack else 0, "fillGradient": 0,
        "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "hiddenSeries": False,
        "id": panel_id,
        "legend": {"alignAsTable": True, "avg": True, "current": True, "hideEmpty": False, "hideZero": False,
                   "max": True, "min": False, "rightSide": False, "show": True, "sort": "current",
                   "sortDesc": True, "total": False, "values": True},
        "lines": True, "linewidth": 1, "nullPointMode": None, "options": {"alertThreshold": True},
        "percentage": False, "pluginVersion": "7.5.17", "pointradius": 2, "points": False, "renderer": "flot",
        "seriesOverrides": [], "spaceLength": 10, "stack": panel.stack, "steppedLine": False,
        "targets": [target_json(t, chr(ord("A") + i)) for i, t in enumerate(panel.targets)],
        "thresholds": [], "timeFrom": None, "timeRegions": [], "timeShift": None,
        "title": panel.title,
        "tooltip": {"shared": True, "sort": 0, "value_type": "individual"},
        "type": "graph",
        "xaxis": {"buckets": None, "mode": "time", "name": None, "show": True, "values": []},
        "yaxes": [{"format": panel.unit, "label": "", "logBase": 1, "max": panel.max, "min": "0", "show": True},
                  {"format": "short", "label": None, "logBase": 1, "max": None, "min": None, "show": True}],
        "yaxis": {"align": False, "alignLevel": None},
    }


def row_json(row: Row, row_id: int, y: int) -> dict:
    return {"collapsed": False, "gridPos": {"h": 1, "w": PANEL_W * COLUMNS, "x": 0, "y": y}, "id": row_id,
            "panels": [], "title": row.title, "type": "row"}


def layout(rows: tuple[Row, ...]) -> list[dict]:
    """Rows top to bottom, each followed by its panels two to a line; ids count up from 1."""
    out, y = [], 0
    for row in rows:
        out.append(row_json(row, len(out) + 1, y))
        y += 1
        for i, panel in enumerate(row.panels):
            out.append(panel_json(panel, len(out) + 1, PANEL_W * (i % COLUMNS), y + PANEL_H * (i // COLUMNS)))
        y += PANEL_H * -(-len(row.panels) // COLUMNS)
    return out


def variable(name: str, label_query: str, description: str, all_value: str) -> dict:
    """A query variable over Ray's node metrics, as in Ray's own dashboards."""
    return {
        "allValue": all_value, "current": {"selected": False}, "datasource": "${datasource}",
        "definition": label_query, "description": description, "error": None, "hide": 0,
        "includeAll": True, "label": None, "multi": False, "name": name, "options": [],
        "query": {"query": label_query, "refId": "StandardVariableQuery"}, "refresh": 1, "regex": "",
        "skipUrlSync": False, "sort": 2, "tagValuesQuery": "", "tags": [], "tagsQuery": "", "type": "query",
        "useTags": False,
    }


def templating() -> dict:
    datasource = {"current": {"selected": False}, "description": "The Prometheus that scrapes Ray's metrics.",
                  "hide": 0, "includeAll": False, "label": "Data source", "multi": False, "name": "datasource",
                  "options": [], "query": "prometheus", "refresh": 1, "regex": "", "skipUrlSync": False,
                  "type": "datasource"}
    session = variable("SessionName", "label_values(ray_node_network_receive_speed, SessionName)",
                       "Filter queries to specific Ray sessions.", ".+")
    cluster = variable("Cluster", 'label_values(ray_node_network_receive_speed{SessionName=~"$SessionName"}, '
                       "ray_io_cluster)", "Filter queries to one Ray cluster (the ray_io_cluster label that "
                       "KubeRay's PodMonitor sets; empty elsewhere).", ".*")
    return {"list": [datasource, session, cluster]}


def dashboard() -> dict:
    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": "-- Grafana --", "enable": True, "hide": True,
                                  "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                                  "type": "dashboard"}]},
        "description": "specserve: serving, speculation, drafters and distillation (Ray metrics via Prometheus).",
        "editable": True, "gnetId": None, "graphTooltip": 1, "links": [],
        "panels": layout(ROWS),
        "refresh": "30s", "schemaVersion": 27, "style": "dark", "tags": ["specserve"],
        "templating": templating(),
        "time": {"from": "now-30m", "to": "now"}, "timepicker": {}, "timezone": "",
        "title": "specserve", "uid": "specserve", "version": 1,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the JSON is stale")
    if parser.parse_args(argv).check:
        if not OUTPUT.exists() or OUTPUT.read_text() != render():
            print(f"stale: {OUTPUT.name} (run .venv/bin/python deploy/grafana/render_dashboard.py)", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
