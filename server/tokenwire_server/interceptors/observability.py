"""Reports each call's outcome: Prometheus metrics, server-span attributes and events,
and one structured log line.

It sits outside the verification gate and the audit so it sees the verified
`Completed`. Per chunk it only counts (and marks the first chunk on the span);
everything else is recorded once, from the outcome, so a 10,000-token answer
costs 10,000 increments of a local integer and one span event, not 10,000
metric updates or span events.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.errors import NotFound, TokenwireError
from tokenwire_server.interceptors.call import Call
from tokenwire_server.interceptors.chain import RESPONDING, Context, Stage
from tokenwire_server.observability.metrics import OPERATION, OTHER, UNRESOLVED, Metrics

log = logging.getLogger("tokenwire.responses")


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else ""


#: Statuses that say the call, not the server, was at fault.
_CALLER_SIDE = frozenset(
    {
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "OUT_OF_RANGE",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
    }
)


#: (provider, request model, response model): the GenAI labels after the operation.
Labels = tuple[str, str, str]


class _ModelSeries:
    """The GenAI histograms' series of one label set, looked up once instead of per call."""

    __slots__ = ("duration", "input_tokens", "output_tokens", "tpot", "ttft")

    def __init__(self, m: Metrics, key: Labels) -> None:
        labels = (OPERATION, *key)
        self.ttft = m.time_to_first_token.labels(*labels)
        self.tpot = m.time_per_output_token.labels(*labels)
        self.duration = m.request_duration.labels(*labels, "")
        self.input_tokens = m.token_usage.labels(*labels, "input")
        self.output_tokens = m.token_usage.labels(*labels, "output")


class _LabelCache:
    """Children of labelled metrics, cached: prometheus-client's `labels()`
    validates and hashes on every call, several microseconds per series."""

    def __init__(self, metric: MetricWrapperBase) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class ObservabilityStage(Stage):
    methods = RESPONDING

    def __init__(self, metrics: Metrics, log_text: bool = False) -> None:
        self._metrics = metrics
        self._log_text = log_text
        self._models: dict[Labels, _ModelSeries] = {}
        self._failed_durations = _LabelCache(metrics.request_duration)
        self._responses = _LabelCache(metrics.responses)
        self._delivery_mode = _LabelCache(metrics.delivery_mode)
        self._verifications = _LabelCache(metrics.verifications)
        self._verdicts = _LabelCache(metrics.verdicts)
        self._redactions = _LabelCache(metrics.redactions)

    def _series(self, key: Labels) -> _ModelSeries:
        series = self._models.get(key)
        if series is None:
            series = self._models[key] = _ModelSeries(self._metrics, key)
        return series

    def _provider(self, model: str) -> str:
        """The provider of the route serving `model`, a name the server resolved:
        one dict lookup in the routing table, so a reload is seen at once."""
        routes = self._metrics.routes
        if routes is None:
            return OTHER
        try:
            backend, _ = routes.resolve(model)
        except NotFound:  # routed away by a reload while the call ran
            return OTHER
        return backend.provider

    def _fallback(self, served: str) -> tuple[str, str]:
        """Provider and model of the route that served after a fallback (rare:
        the upstream before it failed, so a scan of the routes costs nothing)."""
        routes = self._metrics.routes
        found = None
        for backend in routes.backends if routes is not None else ():
            if backend.name == served:
                found = backend  # the last: the config's routes follow the embedded backends
        models = found.models() if found is not None else {}
        if found is None or len(models) != 1:
            return OTHER, OTHER
        return found.provider, next(iter(models))

    async def enter(self, call: Call, context: Context) -> None:
        if call.method == "StreamRespond":
            self._metrics.active_streams.inc()

    def exit(self, call: Call) -> None:
        if call.method == "StreamRespond":
            self._metrics.active_streams.dec()

    async def on_first_event(self, call: Call) -> None:
        if call.span.is_recording():
            call.span.add_event("first_chunk")

    async def on_completed(self, call: Call, completed: pb.Completed, unary: bool) -> None:
        m = self._metrics
        model = completed.model
        serving = completed.serving
        facts = call.facts
        route = facts.backend if facts is not None else serving.backend
        if serving.backend and serving.backend != route:  # another route answered
            provider, response_model = self._fallback(serving.backend)
        else:
            provider, response_model = self._provider(model), model
        series = self._series((provider, model, response_model))
        ttft = completed.timing.time_to_first_token.ToNanoseconds() / 1e9
        total = completed.timing.total.ToNanoseconds() / 1e9
        output = completed.usage.completion_tokens
        series.ttft.observe(ttft)
        if output > 1:
            series.tpot.observe(max(0.0, total - ttft) / (output - 1))
        series.duration.observe(total)
        series.input_tokens.observe(completed.usage.prompt_tokens)
        series.output_tokens.observe(output)
        sent = call.sent
        if sent.chunks:
            m.chunks_sent.inc(sent.chunks)
            m.bytes_sent.inc(sent.bytes)
        if sent.heartbeats:
            m.heartbeats.inc(sent.heartbeats)
        self._responses(call.method, "OK", m.tenant_label(call.tenant)).inc()
        mode = _name(pb.DeliveryMode, completed.delivery_mode, "DELIVERY_MODE_")
        self._delivery_mode(mode).inc()
        verification = _name(
            pb.VerificationStatus, completed.verification.status, "VERIFICATION_STATUS_"
        )
        self._verifications(verification).inc()
        if completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED:
            m.retractions.inc()
        verdict = _name(pb.Verdict, completed.verdict, "VERDICT_")
        self._verdicts(verdict).inc()
        for action in completed.actions:
            if action.operator in (
                pb.GOVERNANCE_OPERATOR_MASK,
                pb.GOVERNANCE_OPERATOR_REPLACE,
                pb.GOVERNANCE_OPERATOR_HASH,
            ):
                self._redactions(action.entity_type).inc()
        if serving.attempts > 1:
            m.upstream_retries.labels(serving.backend).inc(serving.attempts - 1)
        if serving.path == pb.SERVING_PATH_NON_STREAMING or serving.backend != route:
            path = _name(pb.ServingPath, serving.path, "SERVING_PATH_")
            m.upstream_fallbacks.labels(serving.backend, path).inc()

        span = call.span
        if span.is_recording():
            # Each attribute costs ~4 us to encode for export, on the loop: what
            # another attribute or the status says is left out (last_sequence =
            # chunk_count; a unary call's chunk counts say nothing new).
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": OPERATION,
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": model,
                "gen_ai.response.model": response_model,
                "gen_ai.usage.input_tokens": completed.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": output,
                "tokenwire.response_id": completed.response_id,
                "tokenwire.request_id": call.logged_id(completed.request_id),
                "tokenwire.policy": f"{completed.policy_id}@{completed.policy_version}",
                "tokenwire.verdict": verdict,
                "tokenwire.verification": verification,
                "tokenwire.delivery_mode": mode,
            }
            if not unary:
                attributes["tokenwire.chunk_count"] = completed.chunk_count
                attributes["tokenwire.bytes_sent"] = sent.bytes
            if call.tenant:
                attributes["tokenwire.tenant"] = call.tenant
            checks = completed.verification.checks
            if len(checks) > 1:  # more than integrity
                attributes["tokenwire.checks"] = [
                    f"{c.name}={pb.CheckOutcome.Name(c.outcome)}" for c in checks
                ]
            if not completed.verification.checks_passed:
                attributes["tokenwire.checks_passed"] = False
            if completed.review_required:
                attributes["tokenwire.review_required"] = True
            span.set_attributes(attributes)
        if not log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "event": "response",
            "method": call.method,
            "status": "OK",
            "request_id": call.logged_id(completed.request_id),
            "tenant": call.tenant,
            "response_id": completed.response_id,
            "trace_id": completed.trace_id,
            "model": model,
            "model_version": completed.model_version,
            "policy": f"{completed.policy_id}@{completed.policy_version}",
            "verdict": verdict,
            "verification": verification,
            "delivery_mode": mode,
            "chunk_count": completed.chunk_count,
            "finish_reason": _name(pb.FinishReason, completed.finish_reason, "FINISH_REASON_"),
            "prompt_tokens": completed.usage.prompt_tokens,
            "completion_tokens": output,
            "ttft_ms": round(ttft * 1000, 3),
            "total_ms": round(total * 1000, 3),
            "labels": call.logged_labels(),
        }
        if self._log_text:
            fields["final_text"] = completed.final_text
        log.info("response", extra=fields)

    async def on_failed(self, call: Call, error: TokenwireError | None) -> None:
        self._ended_early(call, error.reason if error is not None else "")

    def on_cancelled(self, call: Call) -> None:
        self._ended_early(call, "")

    def _ended_early(self, call: Call, reason: str) -> None:
        m = self._metrics
        status = call.status
        facts = call.facts
        elapsed = time.monotonic() - call.started
        # Only a model the server resolved: a refused request's model name is
        # the caller's free text (a metric label per typo, or a pasted secret).
        # No `Completed`, so no model answered: the response model is "".
        if facts is not None:
            model = facts.model
            provider = self._provider(model)
        else:
            model = provider = UNRESOLVED
        self._failed_durations(OPERATION, provider, model, "", status).observe(elapsed)
        self._responses(call.method, status, m.tenant_label(call.tenant)).inc()
        sent = call.sent
        m.chunks_sent.inc(sent.chunks)
        m.bytes_sent.inc(sent.bytes)
        if sent.heartbeats:
            m.heartbeats.inc(sent.heartbeats)
        if status == "DEADLINE_EXCEEDED":
            m.deadline_expiries.inc()
        elif status == "CANCELLED":
            m.cancellations.inc()
        # A caller that hangs up (a user pressed stop) or sent a request the
        # server refuses is routine, not a server fault: INFO, so a busy
        # server's warnings stay worth reading (and a caller cannot flood them).
        log.log(
            logging.INFO if status in _CALLER_SIDE else logging.WARNING,
            "response failed",
            extra={
                "event": "response",
                "method": call.method,
                "status": status,
                "error_reason": call.progress.error_reason or reason,
                "request_id": call.logged_request_id,
                "response_id": facts.response_id if facts is not None else "",
                "trace_id": call.trace_id,
                "model": facts.model if facts is not None else "",
                "last_sequence": sent.chunks,
                "completion_tokens": call.progress.completion_tokens,
                "total_ms": round(elapsed * 1000, 3),
            },
        )
