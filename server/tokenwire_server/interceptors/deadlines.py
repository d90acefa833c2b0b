"""Bounds every call's run time and hands the budget to the pipeline.

A caller's deadline is honoured but capped at `max_deadline`; a call without
one gets `default_deadline`, so no generation runs unbounded. The absolute
budget goes to the servicer through `CALL_DEADLINE`; the generation watchdog
enforces it (and the stall timeout) and cancels the backend when it passes.
gRPC itself cancels the handler when the caller's own deadline passes or the
caller goes away, and the servicer turns that into backend cancellation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from tokenwire_server.call_context import CALL_DEADLINE
from tokenwire_server.interceptors._wrap import Context, RespondServiceInterceptor


class DeadlineInterceptor(RespondServiceInterceptor):
    def __init__(self, default_deadline: float, max_deadline: float) -> None:
        self._default = default_deadline
        self._max = max_deadline

    async def enter(self, request: Any, context: Context, details: grpc.HandlerCallDetails) -> None:
        remaining = context.time_remaining()
        budget = self._default if remaining is None else min(remaining, self._max)
        CALL_DEADLINE.set(asyncio.get_running_loop().time() + budget)
