"""Prometheus metrics (prometheus-client), named after the OpenTelemetry GenAI
semantic conventions where one exists (`gen_ai.server.time_to_first_token` →
`gen_ai_server_time_to_first_token_seconds`) and `tokenwire_` otherwise.

Everything is recorded once per call from its outcome, never per chunk, so
the hot path pays nothing. Each server owns its registry, so several servers
(tests, embedding) never collide.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OPERATION = "chat"
MAX_TENANT_LABELS = 100
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        model_labels = ("gen_ai_operation_name", "gen_ai_request_model")
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request arrival to the first chunk (GenAI semconv).",
            model_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first (GenAI semconv).",
            model_labels,
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from request arrival to its end, successful or not (GenAI semconv).",
            (*model_labels, "error_type"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per response by type: input or output (GenAI semconv).",
            (*model_labels, "gen_ai_token_type"),
            buckets=_TOKEN_BUCKETS,
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
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def count_spans(self, outcome: str, count: int) -> None:
        self.spans.labels(outcome).inc(count)

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
