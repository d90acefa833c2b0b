"""Metrics scraped over HTTP, spans from an in-memory exporter, and the response log line,
all checked against what a caller actually received."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    start_serve_process,
    stream_request,
)
from tests.test_interceptors import RewritingPolicy
from tests.test_openai_upstream import chunk_event, route, sse
from tokenwire.v1 import respond_pb2 as pb

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


async def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert server.server.metrics_port
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_match_what_callers_received(start_server: StartServer) -> None:
    server = await start_server(metrics_port=0, heartbeat_interval=0.05)
    received: list[pb.StreamRespondResponse] = []
    for _ in range(3):
        received += await collect(server.stub.StreamRespond(stream_request()))
    slow = await collect(
        server.stub.StreamRespond(stream_request(labels={"tokenwire.sim/ttft-ms": "200"}))
    )
    received += slow
    received += await collect(
        server.stub.StreamRespond(stream_request(delivery_mode=pb.DELIVERY_MODE_BUFFERED))
    )
    unary = await server.stub.Respond(pb.RespondRequest(messages=stream_request().messages))

    failing = stream_request(
        chunking=pb.Chunking(max_tokens_per_chunk=1), labels={"tokenwire.sim/fail-after": "3"}
    )
    with pytest.raises(grpc.aio.AioRpcError):
        async for event in server.stub.StreamRespond(failing):
            received.append(event)

    samples = await scrape(server)
    assert value(samples, "tokenwire_chunks_sent_total") == len(chunks_of(received))
    heartbeats = sum(1 for e in received if e.HasField("heartbeat"))
    assert value(samples, "tokenwire_heartbeats_total") == heartbeats
    assert any(e.HasField("heartbeat") for e in slow)
    sent_bytes = sum(len(c.text.encode()) for c in chunks_of(received))
    assert value(samples, "tokenwire_chunk_bytes_sent_total") == sent_bytes
    assert value(samples, "tokenwire_verifications_total", status="VERIFIED") == 6
    assert value(samples, "tokenwire_delivery_mode_total", mode="BUFFERED") == 2
    assert value(samples, "tokenwire_delivery_mode_total", mode="STREAM") == 4
    ok = {"method": "StreamRespond", "status": "OK", "tenant": ""}
    assert value(samples, "tokenwire_responses_total", **ok) == 5
    unary_ok = {"method": "Respond", "status": "OK", "tenant": ""}
    assert value(samples, "tokenwire_responses_total", **unary_ok) == 1
    assert (
        value(
            samples,
            "tokenwire_responses_total",
            method="StreamRespond",
            status="UNAVAILABLE",
            tenant="",
        )
        == 1
    )
    model = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "tokenwire.simulator",
        "gen_ai_request_model": "tokenwire-sim",
        "gen_ai_response_model": "tokenwire-sim",
    }
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count", **model) == 6
    output = 64 * 5 + unary.completed.usage.completion_tokens
    assert (
        value(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **model)
        == output
    )
    assert value(samples, "tokenwire_active_streams") == 0


async def test_deadline_expiries_are_counted_before_the_caller_sees_them(
    start_server: StartServer,
) -> None:
    server = await start_server(metrics_port=0, default_deadline=0.2)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(
            server.stub.StreamRespond(stream_request(labels={"tokenwire.sim/inter-token-ms": "30"}))
        )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    samples = await scrape(server)
    assert value(samples, "tokenwire_deadline_expiries_total") == 1
    status = {"method": "StreamRespond", "status": "DEADLINE_EXCEEDED", "tenant": ""}
    assert value(samples, "tokenwire_responses_total", **status) == 1


async def test_divergence_and_redactions_are_counted(start_server: StartServer) -> None:
    rewriting = await start_server(metrics_port=0, policy=RewritingPolicy("refused"))
    request = stream_request(
        "some streamed words",
        model="echo",
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/echo-token-chars": "3", "tokenwire.sim/inter-token-ms": "1"},
    )
    completed = completed_of(await collect(rewriting.stub.StreamRespond(request)))
    assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
    samples = await scrape(rewriting)
    assert value(samples, "tokenwire_verifications_total", status="DIVERGED") == 1
    assert value(samples, "tokenwire_retractions_total") == 1
    assert value(samples, "tokenwire_verdicts_total", verdict="BLOCKED") == 1

    governed = await start_server(metrics_port=0, policy="builtin:default")
    await collect(
        governed.stub.StreamRespond(stream_request("a@b.io and c@d.io on 10.0.0.1", model="echo"))
    )
    samples = await scrape(governed)
    assert value(samples, "tokenwire_redactions_total", entity_type="EMAIL") == 2
    assert value(samples, "tokenwire_redactions_total", entity_type="IPV4") == 1


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_the_span_continues_the_callers_trace_and_tells_the_whole_call(
    start_server: StartServer, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = await start_server(tracer_provider=provider)
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),)
    events = await collect(server.stub.StreamRespond(stream_request(), metadata=metadata))
    completed = completed_of(events)
    finished = {span.name: span for span in exporter.get_finished_spans()}
    root = finished["/tokenwire.v1.RespondService/StreamRespond"]
    assert format(root.context.trace_id, "032x") == TRACE_ID == completed.trace_id
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT_SPAN
    assert root.attributes["tokenwire.response_id"] == completed.response_id
    assert root.attributes["tokenwire.chunk_count"] == len(chunks_of(events))
    assert root.attributes["tokenwire.verdict"] == "ALLOWED"
    assert root.attributes["tokenwire.verification"] == "VERIFIED"
    assert (
        root.attributes["tokenwire.policy"] == f"{completed.policy_id}@{completed.policy_version}"
    )
    # What generation did is told on the same span: one span per call, and as
    # few attributes and events as say something new, because every span is
    # encoded and exported on the event loop.
    assert root.attributes["tokenwire.backend"] == "simulator"
    assert root.attributes["tokenwire.time_to_first_token_ms"] > 0
    assert "tokenwire.last_sequence" not in root.attributes  # = chunk_count
    assert [e.name for e in root.events] == ["first_chunk"]  # verified: no event
    assert sorted(finished) == ["/tokenwire.v1.RespondService/StreamRespond"]


async def test_a_divergence_is_an_event_on_the_span(
    start_server: StartServer, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = await start_server(policy=RewritingPolicy("Short."), tracer_provider=provider)
    request = stream_request(
        "The quick brown fox jumps over the lazy dog",
        model="echo",
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/echo-token-chars": "4"},
    )
    events = await collect(server.stub.StreamRespond(request))
    completed = completed_of(events)
    assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
    (root,) = exporter.get_finished_spans()
    assert root.attributes["tokenwire.verification"] == "DIVERGED"
    (diverged,) = [e for e in root.events if e.name == "diverged"]
    assert diverged.attributes["tokenwire.retract_from_sequence"] == (
        completed.verification.retract_from_sequence
    )
    assert diverged.attributes["tokenwire.chunks_checked"] == len(chunks_of(events))


async def test_traceparent_is_passed_to_the_http_upstream(
    start_server: StartServer, upstream, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("traceparent", ""))
        return await sse(request, [chunk_event("hi"), chunk_event(None, "stop")])

    up = await upstream(handler)
    provider, exporter = spans
    server = await start_server(upstreams=(route(up.url),), tracer_provider=provider)
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),)
    await collect(server.stub.StreamRespond(stream_request(model="up-model"), metadata=metadata))
    (root,) = exporter.get_finished_spans()
    assert seen == [f"00-{TRACE_ID}-{format(root.context.span_id, '016x')}-01"]


async def test_one_json_ready_log_line_per_response_without_text(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenwire.responses")
    completed = completed_of(await collect(server.stub.StreamRespond(stream_request("secret?"))))
    records = [r for r in caplog.records if r.name == "tokenwire.responses"]
    assert len(records) == 1
    record = records[0]
    assert record.response_id == completed.response_id  # type: ignore[attr-defined]
    assert record.trace_id == completed.trace_id  # type: ignore[attr-defined]
    assert record.chunk_count == completed.chunk_count  # type: ignore[attr-defined]
    assert record.verdict == "ALLOWED" and record.status == "OK"  # type: ignore[attr-defined]
    assert not hasattr(record, "final_text")
    assert "secret?" not in str(record.__dict__)


async def test_failed_calls_log_their_status(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenwire.responses")
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(
            server.stub.StreamRespond(stream_request(labels={"tokenwire.sim/fail-after": "2"}))
        )
    record = next(r for r in caplog.records if r.name == "tokenwire.responses")
    assert record.status == "UNAVAILABLE"  # type: ignore[attr-defined]
    assert record.error_reason == "BACKEND_FAILED"  # type: ignore[attr-defined]
    assert record.levelno == logging.WARNING


async def test_a_caller_hanging_up_is_logged_at_info_not_as_a_warning(
    server: RunningServer,
) -> None:
    """Users stop generations all the time; warnings are kept for what an operator must read."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[logging.LogRecord] = loop.create_future()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not arrived.done():
                loop.call_soon_threadsafe(arrived.set_result, record)

    logger = logging.getLogger("tokenwire.responses")
    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        call = server.stub.StreamRespond(stream_request(params=pb.GenerationParams(max_tokens=500)))
        async for event in call:
            if event.HasField("chunk"):
                break
        call.cancel()
        record = await asyncio.wait_for(arrived, 10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert record.status == "CANCELLED"  # type: ignore[attr-defined]
    assert record.levelno == logging.INFO


async def test_serve_prints_the_metrics_endpoint() -> None:
    process, _ = await start_serve_process("--metrics-port", "0")
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert line.startswith("metrics on http://127.0.0.1:") and line.endswith("/metrics")
        url = line.removeprefix("metrics on ")
        async with aiohttp.ClientSession() as client, client.get(url) as response:
            text = await response.text()
        assert "tokenwire_active_streams" in text
    finally:
        process.terminate()
        await process.wait()
