"""The interceptor chain, in one visible list (first = outermost).

*. malformed requests: a body that does not parse, for health and reflection
   too, is INVALID_ARGUMENT and one rate-limited log line.

0. auth (when configured): API key or mTLS identity → tenant; UNAUTHENTICATED otherwise.
1. tracing: the OpenTelemetry server span; continues the caller's traceparent.
2. request context: request id (echoed as x-request-id) and trace id for the call.
3. observability: metrics, span attributes/events and the log line of each outcome.
4. audit: an append-only, hash-chained row per event of every call past auth,
   committed before what it vouches for leaves; outside limits, so a quota
   refusal gets its row too.
   limits: server-wide and per-tenant concurrency, tokens per minute (RESOURCE_EXHAUSTED).
5. deadlines: default and maximum deadline, the budget handed to the pipeline.
6. verification gate: checks every chunk and holds `Completed` until verified.
"""

from __future__ import annotations

import grpc
from opentelemetry.trace import TracerProvider

from tokenwire_server.audit.store import AuditStore
from tokenwire_server.auth import Authenticator
from tokenwire_server.config import Config
from tokenwire_server.interceptors.audit import AuditInterceptor
from tokenwire_server.interceptors.auth import AuthInterceptor
from tokenwire_server.interceptors.deadlines import DeadlineInterceptor
from tokenwire_server.interceptors.limits import LimitsInterceptor
from tokenwire_server.interceptors.malformed import MalformedRequestInterceptor
from tokenwire_server.interceptors.observability import ObservabilityInterceptor
from tokenwire_server.interceptors.request_context import RequestContextInterceptor
from tokenwire_server.interceptors.tracing import tracing_interceptor
from tokenwire_server.interceptors.verification_gate import VerificationGateInterceptor
from tokenwire_server.observability.metrics import Metrics


def build_chain(
    config: Config,
    tracer_provider: TracerProvider,
    audit_store: AuditStore,
    metrics: Metrics,
    authenticator: Authenticator | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    auth: list[grpc.aio.ServerInterceptor] = []
    if authenticator is not None or config.auth.auth_mtls:
        auth.append(
            AuthInterceptor(
                authenticator,
                accept_certificates=config.auth.auth_mtls,
                every_service=config.auth.auth_health_and_reflection,
            )
        )
    return [
        MalformedRequestInterceptor(),
        *auth,
        tracing_interceptor(tracer_provider),
        RequestContextInterceptor(),
        ObservabilityInterceptor(metrics, log_text=config.logging.log_text),
        AuditInterceptor(audit_store, metrics),
        LimitsInterceptor(config.quotas),
        DeadlineInterceptor(config.deadlines.default_deadline, config.deadlines.max_deadline),
        VerificationGateInterceptor(),
    ]
