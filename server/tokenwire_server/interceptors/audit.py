"""Appends a row to the audit trail for every event of every call that passed auth.

Rows (see `AuditRecord.event`): a stream's `accepted` (or `resumed`) row is
committed before its first event leaves, and every call ends with one of
`completed`, `failed`, `cancelled` or `refused` (ended before a response
existed: an unknown model, an invalid argument, a quota). It sits outside the
limits interceptor so quota refusals get their row, and outside the
verification gate so a `completed` row holds the verified `Completed`.

Fail closed: when a row cannot be committed, nothing it vouches for leaves.
The call ends with UNAVAILABLE / AUDIT_UNAVAILABLE instead of its first event
or its `Completed` (or its unary answer), and
`tokenwire_audit_write_failures_total` counts it. A call that is already
failing keeps its own status (it releases no text, and its status says how to
retry or resume); a cancelled call's row is written without waiting. Per chunk
it does nothing unless the policy asks for token-level events, then it appends
one small tuple; the text itself is never recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import aclosing
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit.records import CALL_RECORD, AuditRecord, CallRecord, TokenEvent
from tokenwire_server.audit.store import AuditStore, AuditWriteError
from tokenwire_server.call_context import CALL_IDENTITY, CALL_TENANT
from tokenwire_server.domain import utf8_length
from tokenwire_server.errors import STATUS_DETAILS_KEY, TokenwireError, abort, clip
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
from tokenwire_server.observability.metrics import Metrics


class AuditUnavailable(TokenwireError):
    """The audit row of this call could not be committed, so the call releases
    nothing more. The message names no file and no cause (the server logs them)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "AUDIT_UNAVAILABLE"
    retry_after = 1.0


def _unavailable() -> AuditUnavailable:
    return AuditUnavailable("the audit trail cannot be written; nothing more is released")


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else ""


def _ms(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e6


def _error_reason(trailing_metadata: Any) -> str:
    """The ErrorInfo reason in a failing call's status details ("" when none)."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


class _StatusHook(AbortHook):
    """An AbortHook that also keeps the ErrorInfo reason of the status it sends."""

    def __init__(
        self, context: Context, before: Callable[[grpc.StatusCode], Awaitable[None]]
    ) -> None:
        super().__init__(context, before)
        self._self_reason = ""

    @property
    def reason(self) -> str:
        return str(self._self_reason)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        if not self.fired:
            self._self_reason = _error_reason(trailing_metadata)
        await super().abort(code, details, trailing_metadata)


#: What a refusal row keeps of the caller's labels: they were not validated (they
#: may be why the call was refused), so they are bounded before they are scrubbed.
REFUSED_LABELS = 8
REFUSED_KEY_CHARS = 64
REFUSED_VALUE_CHARS = 128


def _refused_labels(labels: dict[str, str]) -> dict[str, str]:
    """A refused call's labels as its row keeps them: at most 8, scrubbed, then
    clipped (scrubbed first, so a value the clip cuts is still recognised whole).
    Scrubbing costs ~50 us a string, so only this path pays for it, and a
    refused call can neither write megabytes nor burn milliseconds."""
    kept = itertools.islice(labels.items(), REFUSED_LABELS)
    scrubbed = scrub_labels(
        {key[: REFUSED_KEY_CHARS * 2]: value[: REFUSED_VALUE_CHARS * 2] for key, value in kept}
    )
    return {
        clip(key, REFUSED_KEY_CHARS): clip(value, REFUSED_VALUE_CHARS)
        for key, value in scrubbed.items()
    }


def _event(status: str, record: CallRecord) -> str:
    if status == "OK":
        return "completed"
    if status == "CANCELLED":
        return "cancelled"
    return "failed" if record.response_id else "refused"


class _Call:
    """One call's audit state: what every row of it shares."""

    def __init__(self, request: Any, method: str) -> None:
        self.request = request
        self.method = method
        self.record = CallRecord(started_ns=time.time_ns())
        self._labels: dict[str, str] | None = None
        resuming = isinstance(request, pb.StreamRespondRequest) and request.HasField("resume")
        self.resumed_after = request.resume.after_sequence if resuming else -1

    @property
    def labels(self) -> dict[str, str]:
        """The validated labels, scrubbed once for every row of the call: they
        are the caller's free text, and the trail keeps no value raw."""
        if self._labels is None:
            self._labels = scrub_labels(self.request.labels)
        return self._labels

    def row(self, event: str, status: str, reason: str = "") -> AuditRecord:
        """A row from what the servicer noted (no `Completed`)."""
        record = self.record
        identity = CALL_IDENTITY.get()
        return AuditRecord(
            event=event,
            response_id=record.response_id,
            request_id=scrub(identity.request_id) if identity else "",
            trace_id=identity.trace_id if identity else "",
            tenant=CALL_TENANT.get(),
            method=self.method,
            status=status,
            error_reason=record.error_reason or reason,
            labels=_refused_labels(dict(self.request.labels))
            if event == "refused"
            else self.labels,
            # A refused call's model is what the caller asked for: free text.
            model=record.model or clip(scrub(self.request.model[:256]), 128),
            model_version=record.model_version,
            policy_id=record.policy_id,
            policy_version=record.policy_version,
            delivery_mode="",
            chunk_count=record.last_sequence,
            last_sequence=record.last_sequence,
            final_sha256="",
            verdict="",
            review_required=False,
            verification="",
            retract_from_sequence=0,
            actions=[],
            finish_reason="",
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            time_to_first_token_ms=0.0,
            total_ms=(time.time_ns() - record.started_ns) / 1e6 if status else 0.0,
            created_at_ns=record.started_ns,
            token_events=tuple(record.events) if status else (),
            resumed_after=self.resumed_after,
        )

    def completed(self, completed: pb.Completed) -> AuditRecord:
        return AuditRecord(
            event="completed",
            response_id=completed.response_id,
            request_id=scrub(completed.request_id),
            trace_id=completed.trace_id,
            tenant=CALL_TENANT.get(),
            method=self.method,
            status="OK",
            error_reason="",
            labels=self.labels,
            model=completed.model,
            model_version=completed.model_version,
            policy_id=completed.policy_id,
            policy_version=completed.policy_version,
            delivery_mode=_name(pb.DeliveryMode, completed.delivery_mode, "DELIVERY_MODE_"),
            chunk_count=completed.chunk_count,
            last_sequence=completed.last_sequence,
            final_sha256=completed.final_sha256,
            verdict=_name(pb.Verdict, completed.verdict, "VERDICT_"),
            review_required=completed.review_required,
            verification=_name(
                pb.VerificationStatus, completed.verification.status, "VERIFICATION_STATUS_"
            ),
            retract_from_sequence=completed.verification.retract_from_sequence,
            actions=[
                {
                    "rule_id": a.rule_id,
                    "entity_type": a.entity_type,
                    "operator": _name(pb.GovernanceOperator, a.operator, "GOVERNANCE_OPERATOR_"),
                    "start": a.start,
                    "end": a.end,
                }
                for a in completed.actions
            ],
            finish_reason=_name(pb.FinishReason, completed.finish_reason, "FINISH_REASON_"),
            prompt_tokens=completed.usage.prompt_tokens,
            completion_tokens=completed.usage.completion_tokens,
            time_to_first_token_ms=_ms(completed.timing.time_to_first_token),
            total_ms=_ms(completed.timing.total),
            created_at_ns=self.record.started_ns,
            token_events=tuple(self.record.events),
            resumed_after=self.resumed_after,
        )


class AuditInterceptor(RespondServiceInterceptor):
    #: Calls that produce a response; `Cancel` only acts on one.
    methods = frozenset({"Respond", "StreamRespond"})

    def __init__(self, store: AuditStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def _commit(self, row: AuditRecord) -> bool:
        """Appends the row; False (and counted) when it was not committed."""
        try:
            await self._store.record(row)
        except AuditWriteError:
            self._metrics.audit_write_failures.inc()
            return False
        return True

    def _commit_nowait(self, row: AuditRecord) -> None:
        def counted(done: Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                self._metrics.audit_write_failures.inc()

        self._store.record_nowait(row).add_done_callback(counted)

    def _hook(self, context: Context, call: _Call) -> _StatusHook:
        """Writes the failing call's row just before its status leaves."""

        async def before_status(code: grpc.StatusCode) -> None:
            await self._commit(call.row(_event(code.name, call.record), code.name, hook.reason))

        hook = _StatusHook(context, before_status)
        return hook

    def wrap_unary(
        self, behavior: UnaryBehavior, details: grpc.HandlerCallDetails
    ) -> UnaryBehavior:
        method = method_name(details)

        async def audited(request: Any, context: Context) -> Any:
            call = _Call(request, method)
            CALL_RECORD.set(call.record)
            hooked = self._hook(context, call)
            try:
                response = await behavior(request, hooked.context)
            except asyncio.CancelledError:
                self._commit_nowait(call.row("cancelled", "CANCELLED"))
                raise
            except Exception:
                if not hooked.fired:
                    status = status_name(context)
                    await self._commit(call.row(_event(status, call.record), status))
                raise
            if not await self._commit(call.completed(response.completed)):
                await abort(context, _unavailable())
            return response

        return audited

    def wrap_stream(
        self, behavior: StreamBehavior, details: grpc.HandlerCallDetails
    ) -> StreamBehavior:
        method = method_name(details)

        async def audited(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            call = _Call(request, method)
            record = call.record
            CALL_RECORD.set(record)
            events = record.events
            started = ended = False
            hooked = self._hook(context, call)
            try:
                async with aclosing(behavior(request, hooked.context)) as stream:
                    async for event in stream:
                        if not started:
                            started = True
                            first = "resumed" if call.resumed_after >= 0 else "accepted"
                            if not await self._commit(call.row(first, "")):
                                ended = True
                                await abort(context, _unavailable())
                        if event.HasField("completed"):
                            committed = await self._commit(call.completed(event.completed))
                            ended = True  # a cancellation while committing still gets its row
                            if not committed:
                                await abort(context, _unavailable())
                        elif record.token_events and event.HasField("chunk"):
                            chunk = event.chunk
                            events.append(
                                TokenEvent(
                                    chunk.sequence,
                                    chunk.text_offset,
                                    utf8_length(chunk.text),
                                    chunk.token_count,
                                    len(chunk.governance.actions),
                                    chunk.emitted_at.ToNanoseconds(),
                                )
                            )
                        yield event
            except (asyncio.CancelledError, GeneratorExit):
                if not ended and not hooked.fired:
                    self._commit_nowait(call.row("cancelled", "CANCELLED"))
                raise
            except Exception:
                if not ended and not hooked.fired:
                    status = status_name(context)
                    await self._commit(call.row(_event(status, record), status))
                raise

        return audited
