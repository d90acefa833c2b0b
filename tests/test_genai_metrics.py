"""The GenAI metrics as a scraper sees them: a real server's /metrics after
successful, failed, refused, expired and fallback calls, with the OpenTelemetry
GenAI semantic conventions' label values and bucket boundaries, no `_created`
series, and the standard process metrics beside them."""

from __future__ import annotations

import socket
from collections import defaultdict

import aiohttp
import grpc
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, StartServer, collect, completed_of, stream_request
from tests.test_openai_upstream import chunk_event, route, sse
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.config import UpstreamConfig

#: gen-ai-metrics.md, "This metric SHOULD be specified with ExplicitBucketBoundaries of ...".
SEMCONV_BUCKETS = {
    "gen_ai_server_request_duration_seconds": [
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ],
    "gen_ai_server_time_per_output_token_seconds": [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    ],
    "gen_ai_server_time_to_first_token_seconds": [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ],
    "gen_ai_client_token_usage": [
        1, 4, 16, 64, 256, 1024, 4096, 16384, 65536,
        262144, 1048576, 4194304, 16777216, 67108864,
    ],
}  # fmt: skip
GEN_AI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
SIM = "tokenwire-sim"
#: Generous, so only the calls meant to expire meet the server's 0.3 s default.
TIMEOUT = 30


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _metrics_text(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        assert response.status == 200
        return await response.text()


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(text: str) -> Samples:
    found: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def _label_sets(samples: Samples, name: str) -> set[tuple[str, ...]]:
    """Each series' GenAI labels (operation, provider, request model, response
    model, error type), as a tuple, for the samples named `name`."""
    keys = (*GEN_AI, "gen_ai_response_model", "error_type")
    return {tuple(labels.get(k, "-") for k in keys) for labels, _ in samples[name]}


def _count(samples: Samples, name: str, **wanted: str) -> float:
    return sum(
        value
        for labels, value in samples[name]
        if all(labels.get(k) == v for k, v in wanted.items())
    )


@pytest.fixture
async def gateway(start_server: StartServer, upstream) -> RunningServer:
    """The simulator plus three OpenAI-compatible routes: `primary` (nothing
    listens) falls back to `backup`, `broken` (nothing listens) has no fallback."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return await sse(
            request, [chunk_event("from "), chunk_event("backup"), chunk_event(None, "stop")]
        )

    backup = await upstream(answer)
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    routes = (
        route(dead, name="primary", max_retries=0, fallback=("backup",)),
        UpstreamConfig(name="backup", base_url=backup.url, model="backup-model"),
        UpstreamConfig(
            name="broken", base_url=dead, model="broken-model", max_retries=0, retry_backoff=0.01
        ),
    )
    return await start_server(upstreams=routes, metrics_port=0, default_deadline=0.3)


async def test_every_outcome_carries_the_conventions_labels(gateway: RunningServer) -> None:
    stub = gateway.stub
    # Success on the simulator, streamed and unary.
    completed_of(await collect(stub.StreamRespond(stream_request(), timeout=TIMEOUT)))
    unary = await stub.Respond(
        pb.RespondRequest(messages=stream_request().messages), timeout=TIMEOUT
    )
    assert unary.completed.model == SIM
    # Success through a fallback: `primary` is down, `backup` answers.
    fallback = completed_of(
        await collect(stub.StreamRespond(stream_request(model="up-model"), timeout=TIMEOUT))
    )
    assert (fallback.model, fallback.serving.backend) == ("up-model", "backup")
    # Success on `backup` asked for directly.
    completed_of(
        await collect(stub.StreamRespond(stream_request(model="backup-model"), timeout=TIMEOUT))
    )
    # An upstream that fails (nothing listens, no fallback): UNAVAILABLE.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(stub.StreamRespond(stream_request(model="broken-model"), timeout=TIMEOUT))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # An unknown model, twice with different free text: refused, never a label.
    for typo in ("gpt-4o-typo", "sk-live-secret-pasted-here"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(stub.StreamRespond(stream_request(model=typo), timeout=TIMEOUT))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # A deadline: 64 tokens 30 ms apart do not fit the server's 0.3 s default.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(
            stub.StreamRespond(stream_request(labels={"tokenwire.sim/inter-token-ms": "30"}))
        )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    text = await _metrics_text(gateway)
    assert "gpt-4o-typo" not in text and "sk-live" not in text
    samples = _samples(text)
    duration = "gen_ai_server_request_duration_seconds_count"
    sim = ("chat", "tokenwire.simulator", SIM, SIM)
    assert _label_sets(samples, duration) == {
        (*sim, ""),
        ("chat", "openai", "up-model", "backup-model", ""),
        ("chat", "openai", "backup-model", "backup-model", ""),
        ("chat", "openai", "broken-model", "", "UNAVAILABLE"),
        ("chat", "_unresolved", "_unresolved", "", "NOT_FOUND"),
        ("chat", "tokenwire.simulator", SIM, "", "DEADLINE_EXCEEDED"),
    }
    assert _count(samples, duration, gen_ai_request_model=SIM, error_type="") == 2
    assert _count(samples, duration, error_type="NOT_FOUND") == 2
    # The histograms of successful responses: same labels, no error_type.
    successes = {
        (*sim, "-"),
        ("chat", "openai", "up-model", "backup-model", "-"),
        ("chat", "openai", "backup-model", "backup-model", "-"),
    }
    for name in (
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
    ):
        assert _label_sets(samples, name) == successes, name
    usage = "gen_ai_client_token_usage_count"
    assert _label_sets(samples, usage) == successes
    for token_type in ("input", "output"):
        assert _count(samples, usage, gen_ai_token_type=token_type) == 4
    output = _count(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="output")
    assert output == 64 + unary.completed.usage.completion_tokens + 2 + 2
    assert _count(samples, "gen_ai_server_time_to_first_token_seconds_count") == 4

    # Bucket boundaries as the conventions give them, on every series.
    for family, bounds in SEMCONV_BUCKETS.items():
        les = {labels["le"] for labels, _ in samples[family + "_bucket"]}
        assert sorted(float(le) for le in les) == [*map(float, bounds), float("inf")], family

    # No `_created` series at all, and the process's own metrics.
    assert not [name for name in samples if name.endswith("_created")]
    assert "_created" not in text
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert samples.get(name), name
    assert samples["process_resident_memory_bytes"][0][1] > 0
