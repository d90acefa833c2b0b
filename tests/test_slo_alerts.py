"""The SLO and alert rules in deploy/prometheus are valid, proven to fire and to stay
quiet (promtool's unit tests), name only series the server exports, and fire for
real: a Prometheus scraping a live server sees a stalled stream and a burst of
divergence reach `firing` through its HTTP API.

Also the server side of the stall alert: `StallWatch` counts a generation that
went quiet, once, and not one that a slow reader holds back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from tests.conftest import REQUIRE_POLYGLOT, StartServer, collect, completed_of, stream_request
from tests.test_interceptors import RewritingPolicy
from tests.test_observability import scrape, value
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server import errors
from tokenwire_server.delivery.response import LiveResponse
from tokenwire_server.observability.metrics import TIME_TO_FIRST_TOKEN_BUCKETS, Metrics
from tokenwire_server.observability.stall_watch import StallWatch

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
SERVER_SOURCE = ROOT / "server" / "tokenwire_server"
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenwire-dashboard.json"


def _prometheus_tool(name: str) -> str:
    """Debian's `prometheus` package brings both binaries; skips without them unless
    TOKENWIRE_REQUIRE_POLYGLOT=1 (.ci/run installs the package and sets it)."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} not found: install Debian's prometheus package: apt-get install prometheus"
        )
        if REQUIRE_POLYGLOT:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


# ----- the rule files ---------------------------------------------------------


def test_rule_files_pass_promtool_check() -> None:
    promtool = _prometheus_tool("promtool")
    assert RULE_FILES, RULES_DIR
    for path in RULE_FILES:
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = _prometheus_tool("promtool")
    assert UNIT_TESTS
    result = subprocess.run(
        [promtool, "test", "rules", *map(str, UNIT_TESTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_rule_has_unit_cases_that_fire_and_that_stay_quiet() -> None:
    """Each rule (an alert name with its severity and windows labels) fires in some
    case, and each alert name is expected quiet in some case."""
    variants = {
        (rule["alert"], tuple(sorted(rule.get("labels", {}).items())))
        for rule in _rules()
        if "alert" in rule
    }
    fired: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", ()):
                name = check["alertname"]
                if not check.get("exp_alerts"):
                    quiet.add(name)
                for alert in check.get("exp_alerts") or ():
                    labels = alert["exp_labels"]
                    kept = {k: v for k, v in labels.items() if k in ("severity", "windows")}
                    fired.add((name, tuple(sorted(kept.items()))))
    assert variants and not variants - fired, sorted(variants - fired)
    assert not {name for name, _ in variants} - quiet


def test_generated_slo_rules_are_up_to_date() -> None:
    generator = _generator()
    assert (RULES_DIR / "tokenwire-slo.rules.yml").read_text() == generator.render(), (
        "run: python deploy/prometheus/generate_slo_rules.py"
    )


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "generate_slo_rules", RULES_DIR / "generate_slo_rules.py"
    )
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(generator)
    finally:
        del sys.modules[spec.name]
    return generator


def test_the_ttft_threshold_is_a_bucket_boundary_spelt_as_the_server_writes_it() -> None:
    threshold = _generator().TTFT_THRESHOLD
    assert float(threshold) in TIME_TO_FIRST_TOKEN_BUCKETS
    assert threshold == floatToGoString(float(threshold))  # le="2.5", le="5.0", not "5"


def test_unit_test_series_have_the_labels_the_server_exports() -> None:
    """The promtool cases feed the GenAI histograms with the server's own label
    set (job and instance come from the scrape, le from the histogram)."""
    labelnames = {
        family._name: set(family._labelnames)
        for family in vars(Metrics()).values()
        if isinstance(family, MetricWrapperBase)
    }
    series = [
        s["series"]
        for path in UNIT_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for s in case.get("input_series", ())
    ]
    checked = 0
    for selector in series:
        name, _, labels = selector.partition("{")
        family = re.sub(r"_(bucket|count|sum|total)$", "", name)
        if family not in labelnames:
            continue
        names = set(re.findall(r'(\w+)="', labels)) - {"job", "instance", "le"}
        assert names == labelnames[family], selector
        checked += 1
    assert checked


def _exported_series() -> set[str]:
    metrics = Metrics()
    StallWatch(lambda: (), metrics.registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


def test_rules_read_only_series_the_server_exports_or_the_rules_record() -> None:
    exported = _exported_series()
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used: set[str] = set()
    for rule in _rules():
        expr = rule["expr"]
        for name in recorded:
            expr = expr.replace(name, "")
        used |= set(re.findall(r"\b((?:tokenwire|gen_ai)_[a-z_]+)\b", expr))
    assert used and not used - exported, sorted(used - exported)


def test_data_loss_comes_only_from_the_verification_gate() -> None:
    """TokenwireOrderingViolation reads every DATA_LOSS as an ordering violation the
    gate caught; that holds only while nothing else returns DATA_LOSS."""

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    data_loss = {
        cls for cls in subclasses(errors.TokenwireError) if cls.code == grpc.StatusCode.DATA_LOSS
    }
    assert data_loss == {errors.VerificationFailed}
    raisers = {
        path.relative_to(SERVER_SOURCE).as_posix()
        for path in SERVER_SOURCE.rglob("*.py")
        if re.search(r"\bVerificationFailed\(|StatusCode\.DATA_LOSS", path.read_text())
    }
    assert raisers == {"errors.py", "interceptors/verification_gate.py"}, raisers


# ----- the stall watch ----------------------------------------------------------


class _Response:
    """What StallWatch reads of a LiveResponse."""

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.tokens_generated = 0
        self.has_pending = False
        self.done = False


def test_stall_watch_counts_each_stall_once_and_not_a_slow_reader() -> None:
    registry = CollectorRegistry()
    running: list[_Response] = []
    watch = StallWatch(lambda: cast(list[LiveResponse], running), registry, stall_after=10)

    def counts() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("tokenwire_stalled_streams"),
            registry.get_sample_value("tokenwire_stalls_total"),
        )

    never_starts, stalls, held_back = _Response(0), _Response(0), _Response(0)
    running += [never_starts, stalls, held_back]
    assert watch.check(now=5) == 0
    stalls.tokens_generated = held_back.tokens_generated = 3
    held_back.has_pending = True  # its reader is slow: generation waits by design
    assert watch.check(now=6) == 0
    assert watch.check(now=10.5) == 1  # no first token after 10.5 s
    assert counts() == (1, 1)
    assert watch.check(now=16.5) == 2  # 10.5 s since its last token
    assert watch.check(now=30) == 2 and counts() == (2, 2)  # still stalled: counted once
    stalls.tokens_generated = 4  # it recovers ...
    never_starts.done = True
    assert watch.check(now=31) == 0 and counts() == (0, 2)
    assert watch.check(now=42) == 1 and counts() == (1, 3)  # ... and stalls again
    running.remove(stalls)
    assert watch.check(now=43) == 0 and counts() == (0, 3)


async def test_server_exports_a_stalled_generation_while_it_is_stalled(
    start_server: StartServer,
) -> None:
    # stall_timeout 1.5 s: the watch reports at 0.5 s, the watchdog fails it at 1.5-2.25 s.
    server = await start_server(metrics_port=0, stall_timeout=1.5)
    steady = asyncio.ensure_future(
        collect(
            server.stub.StreamRespond(
                stream_request(
                    labels={
                        "tokenwire.sim/inter-token-ms": "100",
                        "tokenwire.sim/answer-tokens": "30",
                    }
                )
            )
        )
    )
    stalled = server.stub.StreamRespond(stream_request(labels={"tokenwire.sim/stall-after": "2"}))
    reading = asyncio.ensure_future(collect(stalled))
    deadline = time.monotonic() + 10
    while value(await scrape(server), "tokenwire_stalled_streams") != 1:
        assert time.monotonic() < deadline, "the stall never showed"
        await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reading
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # BACKEND_STALLED
    completed_of(await steady)  # 100 ms between tokens is slow, not stalled
    deadline = time.monotonic() + 10
    while value(samples := await scrape(server), "tokenwire_stalled_streams") != 0:
        assert time.monotonic() < deadline, "the ended stall is still shown"
        await asyncio.sleep(0.05)
    assert value(samples, "tokenwire_stalls_total") == 1


# ----- end to end: a real Prometheus against a real server ----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """A real `prometheus` scraping `target` every second and evaluating the real
    rule files every second; yields its base URL once it is ready."""
    binary = _prometheus_tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [{"job_name": "tokenwire", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 20
            while True:
                assert process.returncode is None, (tmp_path / "prometheus.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with client.get(f"{url}/-/ready") as response:
                        if response.status == 200:
                            break
                assert time.monotonic() < deadline, "prometheus did not become ready"
                await asyncio.sleep(0.1)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def _api(client: aiohttp.ClientSession, url: str, path: str, **params: str) -> Any:
    async with client.get(f"{url}/api/v1/{path}", params=params) as response:
        body = await response.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_prometheus_fires_the_stall_and_divergence_alerts_of_a_live_server(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The whole-text policy rewrites every answer after streaming it: each echo
    # call diverges. stall_timeout 6 s: the watch reports a stall after 2 s.
    server = await start_server(
        metrics_port=0, policy=RewritingPolicy("withdrawn"), stall_timeout=6
    )
    async with (
        _prometheus(tmp_path, f"127.0.0.1:{server.server.metrics_port}") as url,
        aiohttp.ClientSession() as client,
    ):
        deadline = time.monotonic() + 20
        # A scrape before the faults: the counters' zero is in Prometheus, so
        # `increase` sees the whole burst.
        query = {"query": "tokenwire_retractions_total"}
        while not (await _api(client, url, "query", **query))["result"]:
            assert time.monotonic() < deadline, "prometheus never scraped the server"
            await asyncio.sleep(0.1)

        injected = time.monotonic()
        stalled = server.stub.StreamRespond(
            stream_request(labels={"tokenwire.sim/stall-after": "3"})
        )
        reading = asyncio.ensure_future(collect(stalled))
        for n in range(8):
            request = stream_request(
                f"answer number {n} streamed in pieces",
                model="echo",
                chunking=pb.Chunking(max_tokens_per_chunk=1),
                labels={"tokenwire.sim/echo-token-chars": "4"},
            )
            completed = completed_of(await collect(server.stub.StreamRespond(request)))
            assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED

        wanted = {
            "TokenwireStreamStalled",
            "TokenwireDivergenceBurst",
            "TokenwireDivergenceBudgetBurn",
        }
        firing_at: dict[str, float] = {}
        deadline = time.monotonic() + 45
        while set(firing_at) != wanted:
            data = await _api(client, url, "alerts")
            for alert in data["alerts"]:
                name = alert["labels"]["alertname"]
                if alert["state"] == "firing" and name not in firing_at:
                    firing_at[name] = time.monotonic() - injected
                    assert name != "TokenwireOrderingViolation", alert
            assert time.monotonic() < deadline, f"firing after 45 s: {firing_at}"
            await asyncio.sleep(0.2)
        stalled.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reading
        firing = {
            (a["labels"]["alertname"], a["labels"].get("instance", ""))
            for a in (await _api(client, url, "alerts"))["alerts"]
            if a["state"] == "firing"
        }
        # Every dashboard query is PromQL this Prometheus accepts, over these rules.
        panels = json.loads(DASHBOARD.read_text())["panels"]
        for target in (t for panel in panels for t in panel.get("targets", ())):
            expr = target["expr"].replace("$provider", ".*").replace("$model", ".*")
            await _api(client, url, "query", query=expr)
        budget = await _api(
            client,
            url,
            "query",
            query=next(
                t["expr"]
                for p in panels
                if p["title"] == "Error budget left (30 days)"
                for t in p["targets"]
            ),
        )
        left = {r["metric"]["slo"]: float(r["value"][1]) for r in budget["result"]}
        assert left["divergence"] < 0, left  # every response diverged: budget overspent
    target = f"127.0.0.1:{server.server.metrics_port}"
    assert ("TokenwireStreamStalled", target) in firing
    assert not any(name == "TokenwireOrderingViolation" for name, _ in firing)
    report = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in sorted(firing_at.items()))
    print(f"\nfiring after the faults were injected: {report}")
