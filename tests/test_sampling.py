"""Spans are recorded when sampled; nothing else depends on sampling.

The sampler is the SDK's (parent-based by default; `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG` choose a ratio). An unsampled call still carries a
trace id (the caller's, else a new one) in `Completed` and the logs, and its
audit rows and metrics are exactly those of a sampled call.
"""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from tests.conftest import StartServer, collect, completed_of, respond_request, stream_request
from tokenwire_server.audit.reader import read_records

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _provider(sampler: object) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_unsampled_calls_keep_their_trace_id_audit_rows_and_metrics(
    start_server: StartServer, tmp_path: Path
) -> None:
    provider, exporter = _provider(ALWAYS_OFF)
    audit = tmp_path / "audit.sqlite3"
    server = await start_server(tracer_provider=provider, audit_path=str(audit))
    streamed = completed_of(await collect(server.stub.StreamRespond(stream_request())))
    unary = (await server.stub.Respond(respond_request())).completed
    assert exporter.get_finished_spans() == ()  # nothing recorded, nothing exported
    assert len(streamed.trace_id) == 32 and int(streamed.trace_id, 16) != 0
    assert len(unary.trace_id) == 32 and unary.trace_id != streamed.trace_id
    await server.server.audit_store.close()
    rows = list(reversed(read_records(audit)))  # newest first
    assert [r["event"] for r in rows] == ["accepted", "completed", "completed"]
    assert rows[1]["trace_id"] == streamed.trace_id
    registry = server.server.metrics.registry
    ok = sum(
        registry.get_sample_value(
            "tokenwire_responses_total", {"method": method, "status": "OK", "tenant": ""}
        )
        or 0.0
        for method in ("Respond", "StreamRespond")
    )
    assert ok == 2


async def test_the_callers_sampling_decision_is_followed(start_server: StartServer) -> None:
    provider, exporter = _provider(ParentBased(ALWAYS_OFF))
    server = await start_server(tracer_provider=provider)
    sampled = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
    unsampled = (("traceparent", f"00-{'1' * 32}-00f067aa0ba902b7-00"),)
    first = completed_of(
        await collect(server.stub.StreamRespond(stream_request(), metadata=sampled))
    )
    second = completed_of(
        await collect(server.stub.StreamRespond(stream_request(), metadata=unsampled))
    )
    assert (first.trace_id, second.trace_id) == (TRACE_ID, "1" * 32)
    traces = {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()}
    assert traces == {TRACE_ID}
