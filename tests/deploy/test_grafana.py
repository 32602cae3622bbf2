"""The Grafana dashboard (deploy/grafana/): the checked-in JSON is what the render script writes,
every query names a metric specserve defines (under the name Ray exports it by), every metric
specserve defines is on some panel, and the panels hang together (ids, datasource, filters,
labels). Metric definitions are read from the source; no cluster is started."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_JSON = GRAFANA / "specserve-dashboard.json"
RENDER_SCRIPT = GRAFANA / "render_dashboard.py"
SOURCE_DIRS = ("actors", "cluster", "kernels")
KINDS = ("Counter", "Gauge", "Histogram")
# labels Ray's metrics agent puts on every custom metric, and those Prometheus / KubeRay add
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version", "instance", "job", "ray_io_cluster"}
FILTERS = ('SessionName=~"$SessionName"', 'ray_io_cluster=~"$Cluster"')

SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
RAY_NAME = re.compile(r"\bray_[a-zA-Z0-9_:]+")
GROUPING = re.compile(r"\bby \(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
VARIABLE = re.compile(r"\$([A-Za-z_]\w*)")
LABEL_REPLACE = re.compile(r'"(\w+)", "[^"]*", "\w+", "[^"]*"\)')  # label_replace's destination label


# ---------------------------------------------------------------- what the code defines


@dataclass(frozen=True)
class MetricDef:
    kind: str  # Counter, Gauge or Histogram (ray.util.metrics)
    name: str
    tag_keys: tuple[str, ...]
    path: str


def _metric_calls(tree: ast.AST):
    """Calls `metrics.Counter(...)`, `metrics.Gauge(...)`, `metrics.Histogram(...)`."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KINDS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "metrics"):
            yield node


def _definition(call: ast.Call, path: str) -> MetricDef:
    name = call.args[0] if call.args else next(k.value for k in call.keywords if k.arg == "name")
    tags = next((k.value for k in call.keywords if k.arg == "tag_keys"), None)
    assert isinstance(name, ast.Constant), f"{path}:{call.lineno}: metric name must be a string literal"
    tag_keys = tuple(ast.literal_eval(tags)) if tags is not None else ()
    return MetricDef(call.func.attr, name.value, tag_keys, path)


@cache
def defined_metrics() -> tuple[MetricDef, ...]:
    """Every ray.util.metrics metric created anywhere in the source folders."""
    found = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            found += [_definition(call, str(path.relative_to(ROOT))) for call in _metric_calls(tree)]
    return tuple(found)


def exported_series(metric: MetricDef) -> set[str]:
    """The Prometheus series names Ray's metrics agent exports for `metric`: "ray_" + name;
    a counter ends in "_total" (added when the name lacks it); a histogram is three series."""
    base = f"ray_{metric.name}"
    if metric.kind == "Counter":
        return {base if base.endswith("_total") else base + "_total"}
    if metric.kind == "Histogram":
        return {base + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {base}


def exported_names() -> dict[str, MetricDef]:
    return {series: m for m in defined_metrics() for series in exported_series(m)}


# ---------------------------------------------------------------- what the dashboard queries


def _render_module():
    """deploy/grafana/render_dashboard.py is a script, not a package module: load it from its path
    (registered under its name first, as its dataclasses look their module up while being built)."""
    spec = importlib.util.spec_from_file_location("deploy_grafana_render_dashboard", RENDER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def graph_panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def targets() -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in graph_panels() for t in p["targets"]]


def referenced(expr: str) -> set[str]:
    """Metric names an expression reads: every name before a selector, and every other ray_* name."""
    bare = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers name labels (ray_io_cluster), not metrics
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{\}", bare)) | set(RAY_NAME.findall(bare))


# ---------------------------------------------------------------- tests


def test_checked_in_dashboard_is_what_the_render_script_writes():
    render = _render_module()
    assert DASHBOARD_JSON.read_text() == render.render(), "run .venv/bin/python deploy/grafana/render_dashboard.py"
    assert render.main(["--check"]) == 0


def test_metric_definitions_are_all_parsed_from_the_source():
    by_file = {m.path for m in defined_metrics()}
    assert {"actors/metrics.py", "actors/distill/hub.py"} <= by_file
    calls = sum(len(re.findall(r"\bmetrics\.(?:Counter|Gauge|Histogram)\(", (ROOT / p).read_text())) for p in by_file)
    assert calls == len(defined_metrics())
    names = [m.name for m in defined_metrics()]
    assert len(names) == len(set(names)), "a metric name is defined twice"
    assert {"specserve_requests_total", "specserve_ttft_seconds", "specserve_distill_loss"} <= set(names)


def test_every_query_reads_only_metrics_specserve_exports():
    exported = exported_names()
    for title, target in targets():
        unknown = referenced(target["expr"]) - exported.keys()
        assert not unknown, f"{title!r} queries {sorted(unknown)}, which specserve does not export"


def test_every_specserve_metric_is_on_some_panel():
    read = set().union(*(referenced(t["expr"]) for _, t in targets()))
    missing = [m.name for m in defined_metrics() if not exported_series(m) & read]
    assert not missing, f"no panel shows {missing}"


def test_panel_ids_are_unique():
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_through_the_datasource_variable():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in graph_panels():
        assert panel["datasource"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == "${datasource}", variable["name"]


def test_every_selector_carries_the_session_and_cluster_filters():
    defined = {v["name"] for v in dashboard()["templating"]["list"]}
    for title, target in targets():
        for name, matchers in SELECTOR.findall(target["expr"]):
            assert all(f in matchers for f in FILTERS), f"{title!r}: {name} is not filtered by session and cluster"
        assert set(VARIABLE.findall(target["expr"])) <= defined, f"{title!r} uses an undefined variable"


def test_grouping_and_legend_labels_exist_on_the_metrics():
    exported = exported_names()
    for title, target in targets():
        expr, names = target["expr"], referenced(target["expr"])
        allowed = RAY_LABELS | {tag for n in names if n in exported for tag in exported[n].tag_keys}
        allowed |= {"le"} if any(n.endswith("_bucket") for n in names) else set()
        grouped = {label.strip() for by in GROUPING.findall(expr) for label in by.split(",") if label.strip()}
        assert grouped <= allowed, f"{title!r} groups by {sorted(grouped - allowed)}, which no series carries"
        added = set(LABEL_REPLACE.findall(expr))
        legend = set(LEGEND_LABEL.findall(target["legendFormat"]))
        assert legend <= grouped | added, f"{title!r}: legend names {sorted(legend - grouped - added)}"


def test_panels_sit_in_the_four_rows_on_the_grid():
    panels = dashboard()["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == ["Serving", "Speculation", "Drafters", "Distillation"]
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cell, f"{p['title']!r} overlaps another panel"
        cells |= cell


def test_dashboard_identity():
    d = dashboard()
    assert (d["uid"], d["tags"], d["schemaVersion"]) == ("specserve", ["specserve"], 27)


# The naming rule above, checked against the exporter the installed Ray runs in its metrics agent
# (the dashboard agent's OpenTelemetry recorder and Prometheus collector), in a fresh process so
# the global meter provider and Prometheus registry it sets up stay out of this one.
_EXPORT = textwrap.dedent("""
    import json, re, sys
    import prometheus_client
    from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder
    recorder = OpenTelemetryMetricRecorder(gauge_metric_ttl_seconds=600)
    for kind, name in json.loads(sys.argv[1]):
        if kind == "Histogram":
            recorder.register_histogram_metric(name, "", [1.0])
        else:
            getattr(recorder, "register_%s_metric" % kind.lower())(name, "")
        recorder.set_metric_value(name, {}, 0.5)
    text = prometheus_client.generate_latest().decode()
    print(json.dumps(sorted({m for m in re.findall(r"^(ray_specserve\\w*)", text, re.M)})))
""")


def test_export_naming_matches_rays_metrics_agent():
    pytest.importorskip("ray._private.telemetry.open_telemetry_metric_recorder")
    metrics = [(m.kind, m.name) for m in defined_metrics()]
    out = subprocess.run([sys.executable, "-c", _EXPORT, json.dumps(metrics)], capture_output=True, text=True,
                         check=True, timeout=120)
    assert set(json.loads(out.stdout.splitlines()[-1])) == set(exported_names())
