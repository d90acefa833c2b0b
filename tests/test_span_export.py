"""Spans reach a real OTLP collector, over HTTP and gRPC, as the environment says.

Each test runs a collector of its own (an aiohttp server answering
/v1/traces, or a grpc.aio TraceService) and a tokenwire server configured only
through the standard OTEL_* variables, then checks what arrived: the call's
spans with the trace id the caller got in `Completed`, the configured headers,
gzip when asked, and that drain posts what is still queued.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.trace import TracerProvider

from tests.conftest import StartServer, collect, completed_of, stream_request
from tokenwire_server.observability.span_export import (
    LoopSpanProcessor,
    OtlpTarget,
    _Sender,
    otlp_target,
    sender_for,
)

STREAM_SPAN = "/tokenwire.v1.RespondService/StreamRespond"


@dataclass
class Collector:
    """What a collector received: decoded requests and the headers they came with."""

    address: str
    requests: list[otlp.ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def record(self, body: bytes, headers: dict[str, str]) -> None:
        async with self.arrived:
            self.requests.append(otlp.ExportTraceServiceRequest.FromString(body))
            self.headers.append(headers)
            self.arrived.notify_all()

    def spans(self) -> dict[str, list[tuple[str, str]]]:
        """Span name → [(trace id, service.name)] over everything received."""
        found: dict[str, list[tuple[str, str]]] = {}
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        found.setdefault(span.name, []).append((span.trace_id.hex(), service))
        return found

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(condition), timeout)


@pytest.fixture
async def http_collector() -> AsyncIterator[Collector]:
    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers["Content-Type"] == "application/x-protobuf"
        await collector.record(body, {k.lower(): v for k, v in request.headers.items()})
        return web.Response(
            body=otlp.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, auto_decompress=False)  # to see the body as sent
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    collector = Collector(f"127.0.0.1:{port}")
    yield collector
    await runner.cleanup()


class _TraceService(otlp_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    async def Export(
        self, request: otlp.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        await self._collector.record(request.SerializeToString(), metadata)
        return otlp.ExportTraceServiceResponse()


@pytest.fixture
async def grpc_collector() -> AsyncIterator[Collector]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    collector = Collector(f"127.0.0.1:{port}")
    otlp_grpc.add_TraceServiceServicer_to_server(_TraceService(collector), server)
    await server.start()
    yield collector
    await server.stop(0)


def export_over_http(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Spans go to `endpoint` over OTLP/HTTP (protobuf), as an operator configures it."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")


async def test_spans_reach_an_http_collector_with_headers_and_gzip(
    start_server: StartServer, http_collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_over_http(monkeypatch, f"http://{http_collector.address}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=blue,authorization=Bearer%20t0k")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tokenwire-test")
    server = await start_server()
    completed = [
        completed_of(await collect(server.stub.StreamRespond(stream_request()))) for _ in range(4)
    ]
    # Four calls, one span each: exactly one batch of four, posted without waiting.
    await http_collector.wait_for(lambda: len(http_collector.spans().get(STREAM_SPAN, [])) == 4)
    spans = http_collector.spans()
    assert sorted(spans[STREAM_SPAN]) == sorted((c.trace_id, "tokenwire-test") for c in completed)
    assert sorted(spans) == [STREAM_SPAN]
    assert len(http_collector.requests) == 1  # four spans joined into one request
    headers = http_collector.headers[0]
    assert headers["x-tenant"] == "blue" and headers["authorization"] == "Bearer t0k"
    registry = server.server.metrics.registry
    assert registry.get_sample_value("tokenwire_spans_total", {"outcome": "exported"}) == 4
    assert headers["content-encoding"] == "gzip"


async def test_spans_reach_a_grpc_collector_with_metadata(
    start_server: StartServer, grpc_collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{grpc_collector.address}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=green")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    server = await start_server()
    completed = completed_of(await collect(server.stub.StreamRespond(stream_request())))
    await grpc_collector.wait_for(lambda: STREAM_SPAN in grpc_collector.spans())
    spans = grpc_collector.spans()
    assert spans[STREAM_SPAN] == [(completed.trace_id, "tokenwire")]
    assert grpc_collector.headers[0]["x-tenant"] == "green"


async def test_drain_posts_spans_still_waiting_for_their_batch(
    start_server: StartServer, http_collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_over_http(monkeypatch, f"http://{http_collector.address}/v1/traces")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # never on its own in this test
    server = await start_server()
    completed = completed_of(await collect(server.stub.StreamRespond(stream_request())))
    assert http_collector.requests == []
    await server.server.drain(grace=0)
    assert http_collector.spans()[STREAM_SPAN] == [(completed.trace_id, "tokenwire")]


async def test_an_unreachable_collector_costs_neither_calls_nor_drain(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, unused_tcp_port: int
) -> None:
    export_over_http(monkeypatch, f"http://127.0.0.1:{unused_tcp_port}/v1/traces")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    server = await start_server()
    for _ in range(3):
        completed = completed_of(await collect(server.stub.StreamRespond(stream_request())))
        assert completed.trace_id
    export = server.server.tracing.export
    assert export is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.server.drain(grace=0)
    assert loop.time() - started < 7  # bounded by the export's 5 s flush limit
    assert export.exported == 0
    registry = server.server.metrics.registry
    assert registry.get_sample_value("tokenwire_spans_total", {"outcome": "failed"}) >= 1
    assert registry.get_sample_value("tokenwire_spans_total", {"outcome": "exported"}) is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
            OtlpTarget("grpc", "http://127.0.0.1:4317"),
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            OtlpTarget("http/protobuf", "http://localhost:4318/v1/traces"),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318/",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
                "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem",
            },
            OtlpTarget(
                "http/protobuf",
                "https://collector:4318/v1/traces",
                timeout=2.5,
                certificate="/etc/ca.pem",
            ),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9999/custom",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:1",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            OtlpTarget("http/protobuf", "http://c:9999/custom"),
        ),
    ],
)
def test_the_target_follows_the_otel_environment(
    env: dict[str, str], expected: OtlpTarget | None
) -> None:
    assert otlp_target(env) == expected


class _GatedSender(_Sender):
    """Holds every post until the test opens the gate: a collector that is slow."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.bodies: list[bytes] = []

    async def send(self, body: bytes) -> bool:
        await self.gate.wait()
        self.bodies.append(body)
        return True


async def test_a_slow_collector_bounds_the_queue_and_counts_what_it_drops() -> None:
    sender = _GatedSender()
    export = LoopSpanProcessor(sender, max_batch=2, max_queue=4, schedule_delay=60)
    provider = TracerProvider()
    provider.add_span_processor(export)
    tracer = provider.get_tracer("test")
    for number in range(10):
        tracer.start_span(f"span-{number}").end()
        await asyncio.sleep(0)  # let the encode callback run, as between calls
    # Two went out in the first post (held at the gate); four more may wait.
    assert export.dropped == 4
    sender.gate.set()
    await export.aclose()
    names = [
        span.name
        for body in sender.bodies
        for resource_spans in otlp.ExportTraceServiceRequest.FromString(body).resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    assert names == [f"span-{n}" for n in range(6)]
    assert export.exported == 6


@pytest.mark.parametrize(
    ("answers", "accepted", "posts"),
    [([503, 200], True, 2), ([400], False, 1), ([503, 503, 503], False, 3)],
)
async def test_an_http_collector_is_retried_only_while_its_answer_is_transient(
    answers: list[int], accepted: bool, posts: int
) -> None:
    received: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(gzip.decompress(await request.read()))
        return web.Response(status=answers[len(received) - 1])

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sender = sender_for(
        OtlpTarget("http/protobuf", f"http://127.0.0.1:{port}/v1/traces", gzip=True)
    )
    try:
        assert await sender.send(b"spans") is accepted
    finally:
        await sender.aclose()
        await runner.cleanup()
    assert received == [b"spans"] * posts


@pytest.mark.parametrize(
    ("answers", "accepted", "posts"),
    [
        ([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK], True, 2),
        ([grpc.StatusCode.INVALID_ARGUMENT], False, 1),
    ],
)
async def test_a_grpc_collector_is_retried_only_while_its_answer_is_transient(
    answers: list[grpc.StatusCode], accepted: bool, posts: int
) -> None:
    received: list[bytes] = []

    async def export(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        received.append(request)
        code = answers[len(received) - 1]
        if code is not grpc.StatusCode.OK:
            await context.abort(code, "scripted")
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                {"Export": grpc.unary_unary_rpc_method_handler(export)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sender = sender_for(OtlpTarget("grpc", f"http://127.0.0.1:{port}"))
    try:
        assert await sender.send(b"spans") is accepted
    finally:
        await sender.aclose()
        await server.stop(0)
    assert received == [b"spans"] * posts
