"""Per-call values that interceptors hand to the servicer.

grpc.aio runs each RPC in its own task, so a context variable set by an
interceptor's wrapper is visible to the handler of that call and to no other.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallIdentity:
    request_id: str
    trace_id: str


#: Set by the request-context interceptor.
CALL_IDENTITY: contextvars.ContextVar[CallIdentity | None] = contextvars.ContextVar(
    "tokenwire_call_identity", default=None
)
#: Absolute event-loop time by which the call must end; set by the deadline interceptor.
CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tokenwire_call_deadline", default=None
)

#: Chunks (sequence, text offset, UTF-8 bytes) the caller already holds when a
#: call resumes a response; the verification gate starts its checks after them.
CALL_REPLAY_PREFIX: contextvars.ContextVar[tuple[tuple[int, int, bytes], ...]] = (
    contextvars.ContextVar("tokenwire_call_replay_prefix", default=())
)

#: The authenticated tenant of the call ("" when authentication is off).
CALL_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tokenwire_call_tenant", default=""
)
