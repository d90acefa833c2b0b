"""The interceptor chain, in one visible list (first = outermost).

1. tracing: the OpenTelemetry server span; continues the caller's traceparent.
2. request context: request id (echoed as x-request-id) and trace id for the call.
3. audit: one durable record per response, committed before `Completed` leaves.
4. deadlines: default and maximum deadline, the budget handed to the pipeline.
5. verification gate: checks every chunk and holds `Completed` until verified.
"""

from __future__ import annotations

import grpc
from opentelemetry.trace import TracerProvider

from tokenwire_server.audit.store import AuditStore
from tokenwire_server.config import Config
from tokenwire_server.interceptors.audit import AuditInterceptor
from tokenwire_server.interceptors.deadlines import DeadlineInterceptor
from tokenwire_server.interceptors.request_context import RequestContextInterceptor
from tokenwire_server.interceptors.tracing import tracing_interceptor
from tokenwire_server.interceptors.verification_gate import VerificationGateInterceptor


def build_chain(
    config: Config, tracer_provider: TracerProvider, audit_store: AuditStore
) -> list[grpc.aio.ServerInterceptor]:
    return [
        tracing_interceptor(tracer_provider),
        RequestContextInterceptor(),
        AuditInterceptor(audit_store),
        DeadlineInterceptor(config.deadlines.default_deadline, config.deadlines.max_deadline),
        VerificationGateInterceptor(),
    ]
