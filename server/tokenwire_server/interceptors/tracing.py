"""The server span of every call, from opentelemetry-instrumentation-grpc.

It continues a caller's W3C `traceparent` and is the outermost interceptor, so
every later stage (and `Completed.trace_id`) runs inside the span.
"""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.trace import TracerProvider


def tracing_interceptor(tracer_provider: TracerProvider) -> grpc.aio.ServerInterceptor:
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider
    )
    return interceptor
