"""Bounds every call's run time and hands the budget to the pipeline.

A caller's deadline is honoured but capped at `max_deadline`; a call without
one gets `default_deadline`, so no generation runs unbounded. The absolute
budget goes to the servicer as `Call.deadline`; the generation watchdog
enforces it (and the stall timeout) and cancels the backend when it passes.
gRPC itself cancels the handler when the caller's own deadline passes or the
caller goes away, and the servicer turns that into backend cancellation.
"""

from __future__ import annotations

import asyncio

from tokenwire_server.interceptors.call import Call
from tokenwire_server.interceptors.chain import Context, Stage


class DeadlineStage(Stage):
    def __init__(self, default_deadline: float, max_deadline: float) -> None:
        self._default = default_deadline
        self._max = max_deadline

    async def enter(self, call: Call, context: Context) -> None:
        remaining = context.time_remaining()
        budget = self._default if remaining is None else min(remaining, self._max)
        call.deadline = asyncio.get_running_loop().time() + budget
