"""The chain every RespondService call runs through, in one visible list (first = outermost).

0. auth (when configured): API key or mTLS identity → tenant; UNAUTHENTICATED otherwise.
   Then the edge: a request body that does not parse is INVALID_ARGUMENT.
1. tracing: the server span; continues the caller's traceparent.
2. request context: request id (echoed as x-request-id).
3. observability: metrics, span attributes/events and the log line of each outcome.
4. audit: an append-only, hash-chained row per event of every call past auth,
   committed before what it vouches for leaves; outside limits, so a quota
   refusal gets its row too.
5. limits: server-wide and per-tenant concurrency, tokens per minute (RESOURCE_EXHAUSTED).
6. deadlines: default and maximum deadline, the budget handed to the pipeline.
7. verification gate: checks every chunk and holds `Completed` until verified.

Each is a `Stage` (chain.py) in its own file; the chain wraps the servicer's
methods once. Health, reflection and the review service are not
RespondService: their malformed bodies and (with `auth_health_and_reflection`)
their credentials are checked by guards wrapped around their handlers where
they are registered (`other_service_guards` below, other_services.py), not by
grpc interceptors, which would run on every RespondService call too.
"""

from __future__ import annotations

from opentelemetry.trace import TracerProvider

from tokenwire_server.audit.store import AuditStore
from tokenwire_server.auth import Authenticator
from tokenwire_server.config import Config
from tokenwire_server.interceptors.audit import AuditStage
from tokenwire_server.interceptors.auth import (
    AuthStage,
    Credentials,
    OtherServicesAuth,
)
from tokenwire_server.interceptors.chain import Chain, Stage
from tokenwire_server.interceptors.deadlines import DeadlineStage
from tokenwire_server.interceptors.limits import LimitsStage
from tokenwire_server.interceptors.malformed import TolerantParsing
from tokenwire_server.interceptors.observability import ObservabilityStage
from tokenwire_server.interceptors.other_services import HandlerGuard
from tokenwire_server.interceptors.request_context import RequestContextStage
from tokenwire_server.interceptors.tracing import TracingStage
from tokenwire_server.interceptors.verification_gate import VerificationGateStage
from tokenwire_server.observability.metrics import Metrics


def _credentials(config: Config, authenticator: Authenticator | None) -> Credentials | None:
    if authenticator is None and not config.auth.auth_mtls:
        return None
    return Credentials(authenticator, accept_certificates=config.auth.auth_mtls)


def build_chain(
    config: Config,
    tracer_provider: TracerProvider,
    audit_store: AuditStore,
    metrics: Metrics,
    authenticator: Authenticator | None = None,
) -> Chain:
    credentials = _credentials(config, authenticator)
    auth: list[Stage] = [AuthStage(credentials)] if credentials is not None else []
    return Chain(
        [
            *auth,
            TracingStage(tracer_provider),
            RequestContextStage(),
            ObservabilityStage(metrics, log_text=config.logging.log_text),
            AuditStage(audit_store, metrics),
            LimitsStage(config.quotas),
            DeadlineStage(config.deadlines.default_deadline, config.deadlines.max_deadline),
            VerificationGateStage(),
        ]
    )


def other_service_guards(
    config: Config, authenticator: Authenticator | None = None
) -> list[HandlerGuard]:
    """What wraps the handlers of the services beside RespondService (innermost first)."""
    guards: list[HandlerGuard] = []
    credentials = _credentials(config, authenticator)
    if credentials is not None and config.auth.auth_health_and_reflection:
        guards.append(OtherServicesAuth(credentials))
    guards.append(TolerantParsing())  # a malformed body is refused before anything else
    return guards
