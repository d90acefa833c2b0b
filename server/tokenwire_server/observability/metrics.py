"""Prometheus metrics (prometheus-client), named after the OpenTelemetry GenAI
semantic conventions where one exists (`gen_ai.server.time_to_first_token` →
`gen_ai_server_time_to_first_token_seconds`) and `tokenwire_` otherwise.

The GenAI histograms carry the conventions' attributes as labels
(`gen_ai_operation_name`, `gen_ai_provider_name`, `gen_ai_request_model`,
`gen_ai_response_model`, and `error_type` on the request duration) and their
bucket boundaries exactly (gen-ai-metrics.md, "ExplicitBucketBoundaries").
docs/observability.md lists every label value.

Everything is recorded once per call from its outcome, never per chunk, so
the hot path pays nothing. Each server owns its registry, so several servers
(tests, embedding) never collide; the registry also holds the standard
process, platform and GC collectors, and no metric exports a `_created` series.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

#: `gen_ai_operation_name`: every RespondService call is a chat completion.
OPERATION = "chat"
#: `gen_ai_request_model` and `gen_ai_provider_name` of a call that ended before
#: the server resolved its model (an unknown model, a refused quota): the name
#: the caller sent is free text and never becomes a label.
UNRESOLVED = "_unresolved"
#: `gen_ai_provider_name` or `gen_ai_response_model` the routing table cannot
#: name (a route reloaded away while the call ran, a server without routes).
OTHER = "_OTHER"
MAX_TENANT_LABELS = 100

# ExplicitBucketBoundaries from the OpenTelemetry GenAI semantic conventions
# (docs/gen-ai/gen-ai-metrics.md), unchanged: dashboards and recording rules
# written for the conventions work on these series as they are.
REQUEST_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TIME_PER_OUTPUT_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TOKEN_USAGE_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536,
    262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
_PER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

#: The labels every GenAI histogram has, in this order.
GEN_AI_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
)


class RoutedBackend(Protocol):
    name: str
    provider: str

    def models(self) -> Mapping[str, str]: ...


class Routes(Protocol):
    """What the metrics read of the routing table (backends/registry.py)."""

    def resolve(self, model: str) -> tuple[RoutedBackend, object]: ...

    @property
    def backends(self) -> Sequence[RoutedBackend]: ...


class Metrics:
    def __init__(self) -> None:
        # The supported switch (prometheus-client has no per-registry one; the
        # environment's PROMETHEUS_DISABLE_CREATED_SERIES=true does the same):
        # `_created` doubles the series of every counter and histogram and no
        # dashboard or rule here reads it. Process-wide, so set with each
        # server's registry, which it must cover.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds...;
        # python_info; python_gc_*: read at scrape time, nothing per call.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        #: The routing table, for the provider and the model of the route that
        #: served (set by the server; None: `_OTHER`).
        self.routes: Routes | None = None
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request arrival to the first chunk, successful responses "
            "(gen_ai.server.time_to_first_token).",
            GEN_AI_LABELS,
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, successful responses "
            "(gen_ai.server.time_per_output_token).",
            GEN_AI_LABELS,
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from request arrival to its end, successful or not; error_type is the "
            'gRPC status of a failed call, "" on success (gen_ai.server.request.duration).',
            (*GEN_AI_LABELS, "error_type"),
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per successful response by type, input or output (gen_ai.client.token.usage, "
            "the only token usage metric the conventions define).",
            (*GEN_AI_LABELS, "gen_ai_token_type"),
            buckets=TOKEN_USAGE_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "tokenwire_active_streams", "StreamRespond calls in flight.", registry=r
        )
        self.chunks_sent = Counter(
            "tokenwire_chunks_sent", "TokenChunks delivered to callers.", registry=r
        )
        self.bytes_sent = Counter(
            "tokenwire_chunk_bytes_sent", "UTF-8 bytes of chunk text delivered.", registry=r
        )
        self.heartbeats = Counter("tokenwire_heartbeats", "Heartbeats sent.", registry=r)
        self.responses = Counter(
            "tokenwire_responses",
            "Finished calls by outcome and tenant.",
            ("method", "status", "tenant"),
            registry=r,
        )
        self._tenants: set[str] = set()
        self.delivery_mode = Counter(
            "tokenwire_delivery_mode", "Delivery mode used per response.", ("mode",), registry=r
        )
        self.verifications = Counter(
            "tokenwire_verifications", "Verification gate results.", ("status",), registry=r
        )
        self.retractions = Counter(
            "tokenwire_retractions",
            "Responses that told the caller to retract chunks.",
            registry=r,
        )
        self.redactions = Counter(
            "tokenwire_redactions",
            "Redactions applied, by entity type.",
            ("entity_type",),
            registry=r,
        )
        self.verdicts = Counter(
            "tokenwire_verdicts", "Governance verdicts.", ("verdict",), registry=r
        )
        self.deadline_expiries = Counter(
            "tokenwire_deadline_expiries", "Calls ended by their deadline.", registry=r
        )
        self.cancellations = Counter(
            "tokenwire_cancellations",
            "Calls cancelled by their caller or the server.",
            registry=r,
        )
        self.upstream_retries = Counter(
            "tokenwire_upstream_retries",
            "Extra upstream requests (retries, fallbacks).",
            ("backend",),
            registry=r,
        )
        self.upstream_fallbacks = Counter(
            "tokenwire_upstream_fallbacks",
            "Responses served by a fallback: a non-streaming request or another upstream.",
            ("backend", "path"),
            registry=r,
        )
        self.spans = Counter(
            "tokenwire_spans",
            "Spans handed to the OTLP exporter: exported, dropped (queue full), "
            "failed (the collector refused them or could not be reached).",
            ("outcome",),
            registry=r,
        )
        self.config_reloads = Counter(
            "tokenwire_config_reloads",
            "SIGHUP reloads by file (keys, tls, policy, routing) and result (ok, failed, "
            "unchanged, restart_required).",
            ("file", "result"),
            registry=r,
        )
        self.config_last_good_load = Gauge(
            "tokenwire_config_last_good_load_timestamp_seconds",
            "Unix time the version in force of each file was last loaded or confirmed unchanged.",
            ("file",),
            registry=r,
        )
        self.audit_write_failures = Counter(
            "tokenwire_audit_write_failures",
            "Audit rows that could not be committed; each one failed its call closed "
            "(UNAVAILABLE, AUDIT_UNAVAILABLE) unless the call was already failing.",
            registry=r,
        )
        # Validators and human review (issue 21): validators/, review/.
        self.validator_checks = Counter(
            "tokenwire_validator_checks",
            "Validator verdicts by validator and outcome (pass, fail, escalate, error, timed_out).",
            ("validator", "outcome"),
            registry=r,
        )
        self.validator_latency = Histogram(
            "tokenwire_validator_latency_seconds",
            "How long each validator's verdict held Completed up.",
            ("validator",),
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.reviews_opened = Counter(
            "tokenwire_reviews_opened",
            "Responses escalated to human review, by action (hold, review_after).",
            ("action",),
            registry=r,
        )
        self.review_decisions = Counter(
            "tokenwire_review_decisions",
            "Reviews leaving PENDING, by state (approved, rejected, edited, expired).",
            ("state",),
            registry=r,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def count_spans(self, outcome: str, count: int) -> None:
        self.spans.labels(outcome).inc(count)

    def count_check(self, validator: str, outcome: str, seconds: float) -> None:
        """The validators' check hook (validators/runner.py)."""
        self.validator_checks.labels(validator, outcome).inc()
        self.validator_latency.labels(validator).observe(seconds)

    def tenant_label(self, tenant: str) -> str:
        """Keeps label cardinality bounded: the first 100 tenants by name, then "other"."""
        if tenant in self._tenants or len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
            return tenant
        return "other"

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
