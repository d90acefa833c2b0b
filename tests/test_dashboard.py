"""The Grafana dashboard only charts metrics the server really exports (the GenAI
histograms, tokenwire's own, the process collectors'), and series the rules in
deploy/prometheus really record; its provider and model filters apply to every
GenAI panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tokenwire_server.observability.metrics import Metrics
from tokenwire_server.observability.stall_watch import StallWatch

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenwire-dashboard.json"
RULE_FILES = sorted((ROOT / "deploy" / "prometheus").glob("*.rules.yml"))
#: A recording rule's name: level:metric:operations.
RECORDED = re.compile(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b")
#: Series of the server's registry: its own and prometheus-client's collectors'.
SERIES = re.compile(r"\b((?:tokenwire|gen_ai|process|python)_[a-z_]+)")


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"]
        exprs += [target["expr"] for target in panel["targets"]]
    return exprs


def _variable_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]


def _recorded() -> set[str]:
    rules: list[dict[str, Any]] = [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    return {rule["record"] for rule in rules if "record" in rule}


def test_every_dashboard_query_names_an_exported_series() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    series, labels = set(), set()
    metrics = Metrics()
    StallWatch(lambda: (), metrics.registry)  # registers the stall metrics
    for family in metrics.registry.collect():
        series |= {family.name + suffix for suffix in suffixes[family.type]}
    for metric in vars(Metrics()).values():
        labels |= set(getattr(metric, "_labelnames", ()))
    used = set()
    for expr in _queries() + _variable_queries():
        expr = RECORDED.sub("", expr)  # recorded series: the next test
        used |= set(SERIES.findall(expr))
    missing = {name for name in used - labels if name not in series}
    assert used and not missing, missing
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used


def test_every_gen_ai_panel_follows_the_provider_and_model_filters() -> None:
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert {"provider", "model"} <= variables
    gen_ai = [expr for expr in _queries() if "gen_ai_" in expr]
    assert gen_ai
    for expr in gen_ai:
        for selector in re.findall(r"\bgen_ai_[a-z_]+(?:\{([^}]*)\})?\[", expr):
            assert 'gen_ai_provider_name=~"$provider"' in selector, expr
            assert 'gen_ai_request_model=~"$model"' in selector, expr


def test_every_recorded_series_the_dashboard_charts_is_recorded_by_the_rules() -> None:
    used = {name for expr in _queries() for name in RECORDED.findall(expr)}
    assert used and not used - _recorded(), sorted(used - _recorded())
