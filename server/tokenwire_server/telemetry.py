"""The tracer provider the server spans come from, and where they go.

An SDK provider is always used so every call has a real trace id to report in
`Completed.trace_id` and logs, even when nothing is exported (spans are then
created and dropped: a cost per call, none per chunk). Export follows the
standard OpenTelemetry environment variables: `OTEL_TRACES_EXPORTER=otlp` or
an `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` turns on OTLP, over gRPC or HTTP per
`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`; `OTEL_TRACES_SAMPLER` and the
exporter's own variables (headers, timeouts, TLS) are read by the SDK.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tokenwire_server import __version__

log = logging.getLogger(__name__)


def _exporter(env: Mapping[str, str]) -> SpanExporter | None:
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if chosen in ("none", "console") or (chosen != "otlp" and not endpoint):
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcOTLPSpanExporter,
    )

    return GrpcOTLPSpanExporter()


#: Spans per export unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE says otherwise.
_EXPORT_BATCH = 32


def build_tracer_provider(env: Mapping[str, str] | None = None) -> TracerProvider:
    env = os.environ if env is None else env
    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME", "tokenwire"),
            "service.version": __version__,
        }
    )
    provider = TracerProvider(resource=resource)
    exporter = _exporter(env)
    if exporter is not None:
        # The exporter encodes a batch while holding the GIL, which stalls the
        # event loop: with the SDK's 512-span batches that showed as 10-25 ms on
        # p99 time to first token (bench/upstream_path.py); 32-span batches keep
        # each stall around a millisecond. OTEL_BSP_MAX_EXPORT_BATCH_SIZE still wins.
        batch = int(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _EXPORT_BATCH))
        provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=batch))
        log.info("exporting traces with %s", type(exporter).__module__)
    return provider
