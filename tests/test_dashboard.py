"""The Grafana dashboard only charts metrics the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenwire_server.observability.metrics import Metrics

DASHBOARD = (
    Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tokenwire-dashboard.json"
)


def test_every_dashboard_query_names_an_exported_series() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    series, labels = set(), set()
    for family in Metrics().registry.collect():
        series |= {family.name + suffix for suffix in suffixes[family.type]}
    for metric in vars(Metrics()).values():
        labels |= set(getattr(metric, "_labelnames", ()))
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\b((?:tokenwire|gen_ai)_[a-z_]+)", target["expr"]))
    missing = {name for name in used - labels if name not in series}
    assert used and not missing, missing
