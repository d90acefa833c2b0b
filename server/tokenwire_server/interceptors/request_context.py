"""Gives every call a request id and a trace id, and echoes the request id back.

The id comes from the request's `request_id`, else the caller's `x-request-id`
header, else is generated; it goes back in the `x-request-id` response header
before anything else leaves, so a caller can correlate even a call that fails
at once.
A caller's own id (field or header, never a generated one) is also the call's
idempotency key: `caller_request_id` is that one precedence, used here and by
the servicer (docs/operations.md, "Idempotency").
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

from tokenwire_server.governance.scrub import scrub
from tokenwire_server.interceptors.call import Call
from tokenwire_server.interceptors.chain import Context, Stage
from tokenwire_server.validation import is_valid_request_id

REQUEST_ID_HEADER = "x-request-id"


def caller_request_id(field: str, metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's own request id: the `request_id` field, else a valid
    `x-request-id` header; "" when the caller gave neither. (An invalid field
    is refused by validation, so it never becomes a key.)"""
    if is_valid_request_id(field):
        return field
    header = str(next((v for k, v in metadata or () if k == REQUEST_ID_HEADER), ""))
    return header if is_valid_request_id(header) else ""


class RequestContextStage(Stage):
    async def enter(self, call: Call, context: Context) -> None:
        call.caller_request_id = caller_request_id(
            getattr(call.request, "request_id", ""), call.metadata
        )
        caller_id = call.caller_request_id
        call.request_id = caller_id or f"req_{uuid.uuid4().hex}"
        # The caller's id is free text and is scrubbed once; a generated one needs none.
        call.logged_request_id = scrub(caller_id) if caller_id else call.request_id
        # Sent while the servicer starts the response (the chain awaits it
        # before anything else leaves), not before: its round trip through
        # grpc core would otherwise add to every call's time to first token.
        call.overlapped.append(asyncio.ensure_future(_send_headers(context, call.request_id)))


async def _send_headers(context: Context, request_id: str) -> None:
    """Yields once first: the response's generation task, created while the
    servicer starts, then sends its upstream request before this grpc batch."""
    await asyncio.sleep(0)
    await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
