"""Appends a row to the audit trail for every event of every call that passed auth.

Rows (see `AuditRecord.event`): a stream's `accepted` (or `resumed`) row is
written as soon as the response is registered (overlapping the upstream's
first token) and committed before its first event leaves, and every call
ends with one of
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
import hashlib
import itertools
import time
from concurrent.futures import Future
from typing import Any

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit.records import AuditRecord, TokenEvent
from tokenwire_server.audit.store import AuditStore, AuditWriteError
from tokenwire_server.domain import utf8_length
from tokenwire_server.errors import AuditUnavailable, TokenwireError, clip
from tokenwire_server.governance.scrub import scrub, scrub_labels
from tokenwire_server.interceptors.call import Call, ResponseFacts
from tokenwire_server.interceptors.chain import RESPONDING, Stage
from tokenwire_server.observability.metrics import Metrics


def _unavailable() -> AuditUnavailable:
    return AuditUnavailable()


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else ""


def _ms(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e6


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


def _event(call: Call) -> str:
    if call.status == "CANCELLED":
        return "cancelled"
    return "failed" if call.facts is not None else "refused"


def _row(call: Call, event: str, reason: str = "") -> AuditRecord:
    """A row from what the servicer reported (no `Completed`)."""
    facts = call.facts
    progress = call.progress
    status = call.status
    request = call.request
    return AuditRecord(
        event=event,
        response_id=facts.response_id if facts is not None else "",
        request_id=call.logged_request_id,
        trace_id=call.trace_id,
        tenant=call.tenant,
        method=call.method,
        status=status,
        error_reason=progress.error_reason or reason,
        labels=_refused_labels(dict(request.labels))
        if event == "refused"
        else call.logged_labels(),
        # A refused call's model is what the caller asked for: free text.
        model=facts.model if facts is not None else clip(scrub(request.model[:256]), 128),
        model_version=facts.model_version if facts is not None else "",
        policy_id=facts.policy_id if facts is not None else "",
        policy_version=facts.policy_version if facts is not None else "",
        delivery_mode="",
        chunk_count=progress.last_sequence,
        last_sequence=progress.last_sequence,
        final_sha256="",
        verdict="",
        review_required=False,
        verification="",
        retract_from_sequence=0,
        actions=[],
        finish_reason="",
        prompt_tokens=facts.prompt_tokens if facts is not None else 0,
        completion_tokens=progress.completion_tokens,
        time_to_first_token_ms=0.0,
        total_ms=(time.time_ns() - call.started_ns) / 1e6 if status else 0.0,
        created_at_ns=call.started_ns,
        token_events=tuple(call.token_events) if status else (),
        resumed_after=_resumed_after(call),
    )


def _checks(checks: Any) -> list[dict[str, object]]:
    """The validators' checks as the row keeps them: names, outcomes, latency and
    violation codes, never their messages (a validator may quote the text)."""
    return [
        {
            "check": c.name,
            "outcome": _name(pb.CheckOutcome, c.outcome, "CHECK_OUTCOME_"),
            "latency_ms": round(_ms(c.latency), 3),
            "violations": [v.code for v in c.violations],
        }
        for c in checks
        if c.name != "integrity"
    ]


def _tool_calls(calls: Any) -> list[dict[str, object]]:
    """Which functions the model called, as the row keeps them: the id, the
    name and a digest of the governed arguments (which can be matched against
    what a tool received) rather than the arguments themselves."""
    return [
        {
            "tool_call": c.name,
            "id": c.id,
            "arguments_sha256": hashlib.sha256(c.arguments.encode()).hexdigest(),
        }
        for c in calls
    ]


def _resumed_after(call: Call) -> int:
    request = call.request
    if isinstance(request, pb.StreamRespondRequest) and request.HasField("resume"):
        return int(request.resume.after_sequence)
    return -1


def _completed_row(call: Call, completed: pb.Completed) -> AuditRecord:
    return AuditRecord(
        event="completed",
        response_id=completed.response_id,
        request_id=call.logged_id(completed.request_id),
        trace_id=completed.trace_id,
        tenant=call.tenant,
        method=call.method,
        status="OK",
        error_reason="",
        labels=call.logged_labels(),
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
        ]
        + _checks(completed.verification.checks)
        + _tool_calls(completed.tool_calls),
        finish_reason=_name(pb.FinishReason, completed.finish_reason, "FINISH_REASON_"),
        prompt_tokens=completed.usage.prompt_tokens,
        completion_tokens=completed.usage.completion_tokens,
        time_to_first_token_ms=_ms(completed.timing.time_to_first_token),
        total_ms=_ms(completed.timing.total),
        created_at_ns=call.started_ns,
        token_events=tuple(call.token_events),
        resumed_after=_resumed_after(call),
    )


class AuditStage(Stage):
    methods = RESPONDING

    def __init__(self, store: AuditStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        #: Streams past their opening row and not yet ended.
        self._streams = 0

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

    def on_facts(self, call: Call, facts: ResponseFacts) -> None:
        """A stream's opening row is recorded here and written while the upstream
        produces its first token; the chain awaits it before the first event.
        Recorded now, not from a task, so it precedes any later row of the call.

        Alone, the loop writes it once the call's upstream request is out (the
        writer thread gets the GIL only when the loop blocks: half of such first
        chunks waited 0.4-0.7 ms for it); beside other streams the loop has no
        idle time, so the thread writes it (docs/performance.md)."""
        if call.method == "StreamRespond":
            first = "resumed" if _resumed_after(call) >= 0 else "accepted"
            row = _row(call, first)
            self._streams += 1
            if self._streams == 1:
                written = self._store.record_soon(row)
            else:
                written = asyncio.wrap_future(self._store.record_nowait(row))
            call.overlapped.append(asyncio.ensure_future(self._opened(call, written)))

    def exit(self, call: Call) -> None:
        if call.method == "StreamRespond" and call.facts is not None:
            self._streams -= 1  # one whose opening row on_facts recorded

    async def _opened(self, call: Call, written: asyncio.Future[None]) -> None:
        try:
            await written
        except Exception:  # logged by the store
            self._metrics.audit_write_failures.inc()
            call.audit_ended = True
            raise _unavailable() from None

    def on_chunk(self, call: Call, chunk: pb.TokenChunk) -> None:
        facts = call.facts
        if facts is not None and facts.token_events:
            call.token_events.append(
                TokenEvent(
                    chunk.sequence,
                    chunk.text_offset,
                    utf8_length(chunk.text),
                    chunk.token_count,
                    len(chunk.governance.actions),
                    chunk.emitted_at.ToNanoseconds(),
                )
            )

    async def on_completed(self, call: Call, completed: pb.Completed, unary: bool) -> None:
        committed = await self._commit(_completed_row(call, completed))
        call.audit_ended = True  # a cancellation while committing still gets its row
        if not committed:
            raise _unavailable()

    async def on_failed(self, call: Call, error: TokenwireError | None) -> None:
        """The failing call's row, committed before its status leaves."""
        if not call.audit_ended:
            call.audit_ended = True
            await self._commit(_row(call, _event(call), error.reason if error else ""))

    def on_cancelled(self, call: Call) -> None:
        if not call.audit_ended:
            call.audit_ended = True
            self._commit_nowait(_row(call, "cancelled"))
