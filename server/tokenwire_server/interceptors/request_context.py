"""Gives every call a request id and a trace id, and echoes the request id back.

The id comes from the request's `request_id`, else the caller's `x-request-id`
header, else is generated; it goes back in the `x-request-id` response header
before anything else, so a caller can correlate even a call that fails at once.
A caller's own id (field or header, never a generated one) is also the call's
idempotency key: `caller_request_id` is that one precedence, used here and by
the servicer (docs/operations.md, "Idempotency").
The trace id is the current OpenTelemetry span's, so this interceptor must sit
inside the tracing interceptor.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import trace

from tokenwire_server.call_context import CALL_IDENTITY, CallIdentity
from tokenwire_server.interceptors._wrap import Context, RespondServiceInterceptor
from tokenwire_server.validation import is_valid_request_id

REQUEST_ID_HEADER = "x-request-id"


def current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def caller_request_id(field: str, metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's own request id: the `request_id` field, else a valid
    `x-request-id` header; "" when the caller gave neither. (An invalid field
    is refused by validation, so it never becomes a key.)"""
    if is_valid_request_id(field):
        return field
    header = str(next((v for k, v in metadata or () if k == REQUEST_ID_HEADER), ""))
    return header if is_valid_request_id(header) else ""


class RequestContextInterceptor(RespondServiceInterceptor):
    async def enter(self, request: Any, context: Context, details: grpc.HandlerCallDetails) -> None:
        request_id = caller_request_id(
            getattr(request, "request_id", ""), details.invocation_metadata
        )
        request_id = request_id or f"req_{uuid.uuid4().hex}"
        CALL_IDENTITY.set(CallIdentity(request_id=request_id, trace_id=current_trace_id()))
        await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
