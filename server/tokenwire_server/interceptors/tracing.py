"""The server span of every RespondService call.

It continues a caller's W3C `traceparent` (the propagators configured for
OpenTelemetry, so `OTEL_PROPAGATORS` applies) and makes the span current for
the rest of the call, so the generation span is its child and
`Completed.trace_id` is the caller's trace. Whether the span is recorded is
the sampler's decision (parent-based by default, `OTEL_TRACES_SAMPLER` /
`OTEL_TRACES_SAMPLER_ARG` to sample a ratio, docs/observability.md): an
unsampled call still has a trace id, and the audit row and metrics do not
depend on sampling. Names and attributes follow the RPC semantic
conventions (`rpc.system`, `rpc.service`, `rpc.method`,
`rpc.grpc.status_code`), as opentelemetry-instrumentation-grpc would set
them; the span is started here rather than by that library's interceptor
because its wrapper adds an async-generator layer to every chunk of every
stream.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from tokenwire_server.interceptors.call import Call
from tokenwire_server.interceptors.chain import Context, Stage
from tokenwire_server.wire import SERVICE_NAME


class _MetadataGetter(Getter[dict[str, str]]):
    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _MetadataGetter()
_STATUS_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
#: Statuses that mark a server span as an error (the RPC conventions).
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


class TracingStage(Stage):
    def __init__(self, tracer_provider: TracerProvider) -> None:
        self._tracer = tracer_provider.get_tracer("tokenwire.server")

    async def enter(self, call: Call, context: Context) -> None:
        carrier = {k: v for k, v in call.metadata if isinstance(v, str)}
        parent = propagate.extract(carrier, getter=_GETTER) if carrier else None
        span = self._tracer.start_span(
            f"/{SERVICE_NAME}/{call.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE_NAME,
                "rpc.method": call.method,
            },
        )
        call.span = span
        span_context = span.get_span_context()
        call.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else ""
        # The call's own task: everything after this runs inside the span (the
        # generation task copies it when it is created). Never detached: the
        # context ends with the call's task.
        otel_context.attach(trace.set_span_in_context(span))

    def exit(self, call: Call) -> None:
        span = call.span
        if span.is_recording():
            status = call.status or "UNKNOWN"
            span.set_attribute("rpc.grpc.status_code", _STATUS_CODES.get(status, 2))
            if status in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, status))
        span.end()
