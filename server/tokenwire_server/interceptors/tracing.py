"""The server span of every RespondService call, from opentelemetry-instrumentation-grpc.

It continues a caller's W3C `traceparent` and is the outermost interceptor, so
every later stage (and `Completed.trace_id`) runs inside the span.

It is limited to RespondService on purpose: the library's aio wrapper iterates
streaming handlers with `async for`, which breaks handlers written in the
reader/writer style such as grpc.health.v1's `Watch`, and health probes every
few seconds would only add noise to traces.
"""

from __future__ import annotations

import logging

import grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.trace import TracerProvider

from tokenwire_server.interceptors._wrap import SERVICE_NAME


def _quiet_context_detach_errors() -> None:
    """When a caller cancels a stream, grpc.aio finalises the handler's generator in
    another context, and the library's `detach` of its context token fails there
    (harmlessly: the RPC's own context ends with its task). It logs that with a
    traceback, at about 0.2 ms per cancelled call; the span itself is fine."""
    logging.getLogger("opentelemetry.context").setLevel(logging.CRITICAL)


def tracing_interceptor(tracer_provider: TracerProvider) -> grpc.aio.ServerInterceptor:
    _quiet_context_detach_errors()
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider, filter_=filters.service_name(SERVICE_NAME)
    )
    return interceptor
