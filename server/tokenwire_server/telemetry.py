"""The tracer provider the server spans come from, and where they go.

An SDK provider is always used so every call has a real trace id to report in
`Completed.trace_id` and logs, even when nothing is exported; then its
sampler records nothing (a caller's trace id is still continued), because a
recorded span that goes nowhere cost 0.19 ms of CPU per unary call. Export follows the
standard OpenTelemetry environment variables: `OTEL_TRACES_EXPORTER=otlp` or
an `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` turns on OTLP, over gRPC or HTTP per
`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`, with the exporter's headers, timeout,
compression and TLS variables and the OTEL_BSP_* batch limits;
`OTEL_TRACES_SAMPLER` is read by the SDK. Spans are exported from the event
loop (observability/span_export.py), not from the SDK's batch thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from tokenwire_server import __version__
from tokenwire_server.observability.span_export import LoopSpanProcessor, span_processor


@dataclass
class Tracing:
    """The provider every span comes from, and the exporter that must be flushed on drain."""

    provider: TracerProvider
    export: LoopSpanProcessor | None = None

    async def aclose(self) -> None:
        if self.export is not None:
            await self.export.aclose()
        self.provider.shutdown()


def build_tracing(env: Mapping[str, str] | None = None) -> Tracing:
    env = os.environ if env is None else env
    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME", "tokenwire"),
            "service.version": __version__,
        }
    )
    export = span_processor(env)
    if export is None:
        return Tracing(TracerProvider(resource=resource, sampler=ALWAYS_OFF))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(export)
    return Tracing(provider, export)
