"""Writes one audit record per response, before the terminal message leaves.

It sits outside the verification gate so the record holds the verified
`Completed` (verdict, verification, digest, counts, timings), and it awaits
the store before letting `Completed` go: a caller never sees the end of a
response whose record is not committed. Failed calls are recorded with their
status and partial usage; a call cancelled by its caller is recorded without
waiting (its task is already being cancelled). Per chunk it does nothing
unless the policy asks for token-level events, then it appends one small
tuple; the text itself is never recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit.records import CALL_RECORD, AuditRecord, CallRecord, TokenEvent
from tokenwire_server.audit.store import AuditStore
from tokenwire_server.call_context import CALL_IDENTITY, CALL_TENANT
from tokenwire_server.domain import utf8_length
from tokenwire_server.interceptors._wrap import (
    AbortHook,
    Context,
    RespondServiceInterceptor,
    StreamBehavior,
    UnaryBehavior,
    method_name,
    status_name,
)


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else ""


def _seconds(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e6


class AuditInterceptor(RespondServiceInterceptor):
    #: Calls that produce a response; `Cancel` only acts on one.
    methods = frozenset({"Respond", "StreamRespond"})

    def __init__(self, store: AuditStore) -> None:
        self._store = store

    def _build(
        self,
        request: Any,
        record: CallRecord,
        method: str,
        completed: pb.Completed | None,
        status: str,
    ) -> AuditRecord | None:
        identity = CALL_IDENTITY.get()
        if completed is None:
            if not record.response_id:
                return None  # rejected before a response existed: nothing to audit
            return AuditRecord(
                response_id=record.response_id,
                request_id=identity.request_id if identity else "",
                trace_id=identity.trace_id if identity else "",
                tenant=CALL_TENANT.get(),
                method=method,
                status=status,
                error_reason=record.error_reason,
                labels=dict(request.labels),
                model=record.model,
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
                total_ms=(time.time_ns() - record.started_ns) / 1e6,
                created_at_ns=record.started_ns,
                token_events=tuple(record.events),
            )
        return AuditRecord(
            response_id=completed.response_id,
            request_id=completed.request_id,
            trace_id=completed.trace_id,
            tenant=CALL_TENANT.get(),
            method=method,
            status=status,
            error_reason="",
            labels=dict(request.labels),
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
            time_to_first_token_ms=_seconds(completed.timing.time_to_first_token),
            total_ms=_seconds(completed.timing.total),
            created_at_ns=record.started_ns,
            token_events=tuple(record.events),
        )

    async def _write(self, record: AuditRecord | None) -> None:
        if record is not None:
            await self._store.record(record)

    def _write_nowait(self, record: AuditRecord | None) -> None:
        if record is not None:
            self._store.record_nowait(record)

    def wrap_unary(
        self, behavior: UnaryBehavior, details: grpc.HandlerCallDetails
    ) -> UnaryBehavior:
        method = method_name(details)

        async def audited(request: Any, context: Context) -> Any:
            record = CallRecord(started_ns=time.time_ns())
            CALL_RECORD.set(record)

            async def before_status(code: grpc.StatusCode) -> None:
                await self._write(self._build(request, record, method, None, code.name))

            hooked = AbortHook(context, before_status)
            try:
                response = await behavior(request, hooked.context)
            except asyncio.CancelledError:
                self._write_nowait(self._build(request, record, method, None, "CANCELLED"))
                raise
            except Exception:
                if not hooked.fired:
                    status = status_name(context)
                    await self._write(self._build(request, record, method, None, status))
                raise
            await self._write(self._build(request, record, method, response.completed, "OK"))
            return response

        return audited

    def wrap_stream(
        self, behavior: StreamBehavior, details: grpc.HandlerCallDetails
    ) -> StreamBehavior:
        method = method_name(details)

        async def audited(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            record = CallRecord(started_ns=time.time_ns())
            CALL_RECORD.set(record)
            events = record.events
            written = False

            async def before_status(code: grpc.StatusCode) -> None:
                await self._write(self._build(request, record, method, None, code.name))

            hooked = AbortHook(context, before_status)
            try:
                async with aclosing(behavior(request, hooked.context)) as stream:
                    async for event in stream:
                        if event.HasField("completed"):
                            await self._write(
                                self._build(request, record, method, event.completed, "OK")
                            )
                            written = True
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
                if not written and not hooked.fired:
                    self._write_nowait(self._build(request, record, method, None, "CANCELLED"))
                raise
            except Exception:
                if not hooked.fired:
                    status = status_name(context)
                    await self._write(self._build(request, record, method, None, status))
                raise

        return audited
