"""Counts generations that went quiet, so an alert can fire while they are still open.

The generation watchdog (`delivery/generation.py`) fails a generation whose
backend produced no token for `stall_timeout` seconds, and that failure shows
in `tokenwire_responses_total{status="UNAVAILABLE"}`, but only once it is over:
for 30 to 45 seconds a caller watched a frozen answer and no metric said so.
This watch makes the stall visible while it happens:

* `tokenwire_stalled_streams` (gauge): responses generating on this replica
  that produced no new token for more than `stall_after` seconds;
* `tokenwire_stalls_total` (counter): each such stall, counted once when it
  crosses `stall_after` (a response that stalls, recovers and stalls again
  counts twice), so a stall shorter than a scrape interval is not lost.

It costs nothing per token: once a second it reads `tokens_generated`, which
generation already maintains, of every response the store lists as running
here, and remembers when each count last moved. A response whose released text
is still pending is not stalled: a slow reader holds generation back by design
(the watchdog suspends for it too).

Scope: `ResponseStore.running_here()`, i.e. every response with the in-memory
store, but with the Redis store only those no other replica can take over (no
request id, not resumable); the shared ones are not watched yet. Their stalls
still end in the watchdog's `BACKEND_STALLED` failure, which the stream
stability SLO counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from tokenwire_server.delivery.response import LiveResponse

log = logging.getLogger(__name__)

#: Seconds without a new token before a running generation counts as stalled.
DEFAULT_STALL_AFTER = 10.0
#: Seconds between two looks; the gauge is at most this late.
DEFAULT_INTERVAL = 1.0


@dataclass(slots=True)
class _Progress:
    tokens: int
    since: float
    stalled: bool = False


class StallWatch:
    """A periodic task exporting the stalled-generation gauge and counter.

    `running` lists the responses generating here (the store's `running_here`);
    the metrics are registered on `registry` (the server's), so every server in
    one process keeps its own.
    """

    def __init__(
        self,
        running: Callable[[], Iterable[LiveResponse]],
        registry: CollectorRegistry,
        stall_after: float = DEFAULT_STALL_AFTER,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if stall_after <= 0 or interval <= 0:
            raise ValueError("stall_after and interval must be positive")
        self._running = running
        self.stall_after = stall_after
        self._interval = interval
        self.stalled = Gauge(
            "tokenwire_stalled_streams",
            f"Responses generating here with no new token for more than {stall_after:g}s.",
            registry=registry,
        )
        self.stalls = Counter(
            "tokenwire_stalls",
            f"Generations that went {stall_after:g}s without a new token, each stall once.",
            registry=registry,
        )
        self._seen: dict[LiveResponse, _Progress] = {}
        self._task: asyncio.Task[None] | None = None

    def check(self, now: float | None = None) -> int:
        """One look at what runs here (loop time `now`); returns how many are stalled."""
        now = asyncio.get_running_loop().time() if now is None else now
        seen: dict[LiveResponse, _Progress] = {}
        stalled = 0
        for response in self._running():
            if response.done:
                continue
            tokens = response.tokens_generated
            progress = self._seen.get(response)
            if progress is None:
                # Before the first token the clock runs from the request's arrival:
                # a backend that never starts is a stall too.
                progress = _Progress(tokens, response.started_at if tokens == 0 else now)
            elif tokens != progress.tokens or response.has_pending:
                progress.tokens, progress.since, progress.stalled = tokens, now, False
            if now - progress.since > self.stall_after:
                stalled += 1
                if not progress.stalled:
                    progress.stalled = True
                    self.stalls.inc()
            seen[response] = progress
        self._seen = seen  # ended responses drop out here
        self.stalled.set(stalled)
        return stalled

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stall watch")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.check()
            except Exception:  # a bug here must not end the watch for the process's life
                log.exception("stall watch check failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._seen.clear()
        self.stalled.set(0)
