"""Each exported span is the same OTLP message the OpenTelemetry encoder makes.

The spans come from real calls through the server (unary, streamed, refused,
failed mid-stream, continuing a caller's traceparent, with labels and
non-ASCII text), recorded by an in-memory exporter; each is encoded by
`SpanEncoder` and by `encode_spans`, and the decoded messages must be equal.
"""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import StartServer, collect, respond_request, stream_request
from tokenwire_server.observability.span_encoding import SpanEncoder

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def served_spans(start_server: StartServer) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "tokenwire-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await start_server(tracer_provider=provider)
    await server.stub.Respond(respond_request("grüße, ok"))
    await collect(
        server.stub.StreamRespond(
            stream_request(labels={"team": "zürich"}), metadata=(("traceparent", TRACEPARENT),)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(server.stub.StreamRespond(stream_request(model="no-such-model")))
    with pytest.raises(grpc.aio.AioRpcError):
        faulty = stream_request(labels={"tokenwire.sim/fail-after": "2"})
        await collect(server.stub.StreamRespond(faulty))
    spans = list(exporter.get_finished_spans())
    assert len(spans) == 4
    return spans


async def test_every_span_decodes_to_what_the_library_encodes(start_server: StartServer) -> None:
    encoder = SpanEncoder()
    for span in await served_spans(start_server):
        for _ in range(2):  # the envelope made, then reused
            ours = otlp.ExportTraceServiceRequest.FromString(encoder.request(span))
            assert ours == encode_spans([span]), span.name


async def test_a_batch_of_requests_is_one_request_with_every_span(
    start_server: StartServer,
) -> None:
    """Batches are concatenated requests: protobuf merges them into one."""
    spans = await served_spans(start_server)
    encoder = SpanEncoder()
    batch = otlp.ExportTraceServiceRequest.FromString(
        b"".join(encoder.request(span) for span in spans)
    )
    encoded = [s for rs in batch.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.span_id for s in encoded] == [s.context.span_id.to_bytes(8, "big") for s in spans]
    assert {rs.resource.SerializeToString() for rs in batch.resource_spans} == {
        encode_spans(spans[:1]).resource_spans[0].resource.SerializeToString()
    }


def test_spans_of_another_resource_get_their_own_envelope() -> None:
    encoder = SpanEncoder()
    requests = []
    for name in ("one", "two", "one"):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider.get_tracer("scope-" + name).start_span("work").end()
        (span,) = exporter.get_finished_spans()
        decoded = otlp.ExportTraceServiceRequest.FromString(encoder.request(span))
        assert decoded == encode_spans([span])
        requests.append(decoded.resource_spans[0])
    names = [
        next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
        for rs in requests
    ]
    assert names == ["one", "two", "one"]
    assert [rs.scope_spans[0].scope.name for rs in requests] == [
        "scope-one",
        "scope-two",
        "scope-one",
    ]
