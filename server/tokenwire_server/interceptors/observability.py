"""Reports each call's outcome: Prometheus metrics, server-span attributes and events,
and one structured log line.

It sits outside the verification gate and the audit so it sees the verified
`Completed`. Per chunk it only counts (and marks the first chunk on the span);
everything else is recorded once, from the outcome, so a 10,000-token answer
costs 10,000 increments of a local integer and one span event, not 10,000
metric updates or span events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import grpc
from opentelemetry import trace

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit.records import CALL_RECORD
from tokenwire_server.call_context import CALL_IDENTITY, CALL_TENANT
from tokenwire_server.domain import utf8_length
from tokenwire_server.governance.scrub import scrub, scrub_labels
from tokenwire_server.interceptors._wrap import (
    AbortHook,
    Context,
    RespondServiceInterceptor,
    StreamBehavior,
    UnaryBehavior,
    method_name,
    status_name,
)
from tokenwire_server.observability.metrics import OPERATION, Metrics

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


class ObservabilityInterceptor(RespondServiceInterceptor):
    #: Calls that produce a response; `Cancel` only acts on one.
    methods = frozenset({"Respond", "StreamRespond"})

    def __init__(self, metrics: Metrics, log_text: bool = False) -> None:
        self._metrics = metrics
        self._log_text = log_text

    def _completed(
        self,
        method: str,
        request: Any,
        completed: pb.Completed,
        chunks: int,
        sent_bytes: int,
        heartbeats: int,
    ) -> None:
        m = self._metrics
        model = completed.model
        labels = (OPERATION, model)
        ttft = completed.timing.time_to_first_token.ToNanoseconds() / 1e9
        total = completed.timing.total.ToNanoseconds() / 1e9
        output = completed.usage.completion_tokens
        m.time_to_first_token.labels(*labels).observe(ttft)
        if output > 1:
            m.time_per_output_token.labels(*labels).observe(max(0.0, total - ttft) / (output - 1))
        m.request_duration.labels(*labels, "").observe(total)
        m.token_usage.labels(*labels, "input").observe(completed.usage.prompt_tokens)
        m.token_usage.labels(*labels, "output").observe(output)
        m.chunks_sent.inc(chunks)
        m.bytes_sent.inc(sent_bytes)
        if heartbeats:
            m.heartbeats.inc(heartbeats)
        m.responses.labels(method, "OK", m.tenant_label(CALL_TENANT.get())).inc()
        mode = _name(pb.DeliveryMode, completed.delivery_mode, "DELIVERY_MODE_")
        m.delivery_mode.labels(mode).inc()
        verification = _name(
            pb.VerificationStatus, completed.verification.status, "VERIFICATION_STATUS_"
        )
        m.verifications.labels(verification).inc()
        if completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED:
            m.retractions.inc()
        verdict = _name(pb.Verdict, completed.verdict, "VERDICT_")
        m.verdicts.labels(verdict).inc()
        for action in completed.actions:
            if action.operator in (
                pb.GOVERNANCE_OPERATOR_MASK,
                pb.GOVERNANCE_OPERATOR_REPLACE,
                pb.GOVERNANCE_OPERATOR_HASH,
            ):
                m.redactions.labels(action.entity_type).inc()
        serving = completed.serving
        if serving.attempts > 1:
            m.upstream_retries.labels(serving.backend).inc(serving.attempts - 1)
        record = CALL_RECORD.get()
        route = record.backend if record is not None else serving.backend
        if serving.path == pb.SERVING_PATH_NON_STREAMING or serving.backend != route:
            path = _name(pb.ServingPath, serving.path, "SERVING_PATH_")
            m.upstream_fallbacks.labels(serving.backend, path).inc()

        span = trace.get_current_span()
        span.set_attributes(
            {
                "gen_ai.operation.name": OPERATION,
                "gen_ai.request.model": model,
                "gen_ai.usage.input_tokens": completed.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": output,
                "tokenwire.response_id": completed.response_id,
                "tokenwire.request_id": scrub(completed.request_id),
                "tokenwire.chunk_count": completed.chunk_count,
                "tokenwire.last_sequence": completed.last_sequence,
                "tokenwire.verdict": verdict,
                "tokenwire.verification": verification,
                "tokenwire.delivery_mode": mode,
                "tokenwire.tenant": CALL_TENANT.get(),
            }
        )
        span.add_event(
            "completed", {"tokenwire.chunks_sent": chunks, "tokenwire.bytes_sent": sent_bytes}
        )
        fields: dict[str, Any] = {
            "event": "response",
            "method": method,
            "status": "OK",
            "request_id": scrub(completed.request_id),
            "tenant": CALL_TENANT.get(),
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
            "labels": scrub_labels(request.labels),
        }
        if self._log_text:
            fields["final_text"] = completed.final_text
        log.info("response", extra=fields)

    def _failed(
        self,
        method: str,
        status: str,
        started: float,
        chunks: int,
        sent_bytes: int,
        heartbeats: int,
        request: Any,
    ) -> None:
        m = self._metrics
        record = CALL_RECORD.get()
        identity = CALL_IDENTITY.get()
        # Only a model the server resolved: a refused request's model name is
        # the caller's free text (a metric label per typo, or a pasted secret).
        model = record.model if record is not None else ""
        m.request_duration.labels(OPERATION, model, status).observe(time.monotonic() - started)
        m.responses.labels(method, status, m.tenant_label(CALL_TENANT.get())).inc()
        m.chunks_sent.inc(chunks)
        m.bytes_sent.inc(sent_bytes)
        if heartbeats:
            m.heartbeats.inc(heartbeats)
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
                "method": method,
                "status": status,
                "error_reason": record.error_reason if record is not None else "",
                "request_id": scrub(identity.request_id) if identity is not None else "",
                "response_id": record.response_id if record is not None else "",
                "trace_id": identity.trace_id if identity is not None else "",
                "model": model,
                "last_sequence": chunks,
                "completion_tokens": record.completion_tokens if record is not None else 0,
                "total_ms": round((time.monotonic() - started) * 1000, 3),
            },
        )

    def wrap_unary(
        self, behavior: UnaryBehavior, details: grpc.HandlerCallDetails
    ) -> UnaryBehavior:
        method = method_name(details)

        async def observed(request: Any, context: Context) -> Any:
            started = time.monotonic()

            async def before_status(code: grpc.StatusCode) -> None:
                self._failed(method, code.name, started, 0, 0, 0, request)

            hooked = AbortHook(context, before_status)
            try:
                response = await behavior(request, hooked.context)
            except asyncio.CancelledError:
                self._failed(method, "CANCELLED", started, 0, 0, 0, request)
                raise
            except Exception:
                if not hooked.fired:
                    self._failed(method, status_name(context), started, 0, 0, 0, request)
                raise
            self._completed(method, request, response.completed, 0, 0, 0)
            return response

        return observed

    def wrap_stream(
        self, behavior: StreamBehavior, details: grpc.HandlerCallDetails
    ) -> StreamBehavior:
        method = method_name(details)
        active = self._metrics.active_streams

        async def observed(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            started = time.monotonic()
            chunks = heartbeats = 0
            first: pb.TokenChunk | None = None
            last: pb.TokenChunk | None = None

            def sent_bytes() -> int:
                if first is None or last is None:
                    return 0
                return last.text_offset + utf8_length(last.text) - first.text_offset

            async def before_status(code: grpc.StatusCode) -> None:
                self._failed(method, code.name, started, chunks, sent_bytes(), heartbeats, request)

            hooked = AbortHook(context, before_status)
            active.inc()
            try:
                async with aclosing(behavior(request, hooked.context)) as stream:
                    async for event in stream:
                        kind = event.WhichOneof("event")
                        if kind == "chunk":
                            last = event.chunk
                            chunks += 1
                            if first is None:
                                first = last
                                trace.get_current_span().add_event("first_chunk")
                        elif kind == "completed":
                            self._completed(
                                method, request, event.completed, chunks, sent_bytes(), heartbeats
                            )
                        else:
                            heartbeats += 1
                        yield event
            except (asyncio.CancelledError, GeneratorExit):
                if not hooked.fired:
                    self._failed(
                        method, "CANCELLED", started, chunks, sent_bytes(), heartbeats, request
                    )
                raise
            except Exception:
                if not hooked.fired:
                    status = status_name(context)
                    self._failed(method, status, started, chunks, sent_bytes(), heartbeats, request)
                raise
            finally:
                active.dec()

        return observed
