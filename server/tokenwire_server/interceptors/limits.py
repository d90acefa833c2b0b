"""Admission control: server-wide and per-tenant concurrency, and tokens per minute.

Over a limit a call gets RESOURCE_EXHAUSTED at once (after at most a short
bounded wait for a server-wide slot) with `QuotaFailure` naming the limit and
`RetryInfo` saying when to try again: never a hang, never a crash. Tokens per
minute is a token bucket per tenant, debited with each response's generated
tokens when it ends; a tenant may start a call while its bucket is positive.
"""

from __future__ import annotations

import asyncio
import time

from tokenwire_server.config import QuotaConfig
from tokenwire_server.errors import QuotaExceeded, QuotaViolation
from tokenwire_server.interceptors.call import Call
from tokenwire_server.interceptors.chain import RESPONDING, Context, Stage


class _Bucket:
    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()

    def refill(self) -> float:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        return self.level


class LimitsStage(Stage):
    methods = RESPONDING

    def __init__(self, quotas: QuotaConfig) -> None:
        self._quotas = quotas
        self._slots = asyncio.Semaphore(quotas.max_concurrent_calls)
        self._tenant_calls: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    async def enter(self, call: Call, context: Context) -> None:
        q = self._quotas
        tenant = call.tenant
        if q.tenant_tokens_per_minute:
            bucket = self._buckets.setdefault(tenant, _Bucket(q.tenant_tokens_per_minute))
            level = bucket.refill()
            if level <= 0:
                raise QuotaExceeded(
                    f"tenant {tenant!r} used its {q.tenant_tokens_per_minute} tokens per minute",
                    reason="TOKENS_PER_MINUTE_EXCEEDED",
                    quota=[QuotaViolation(f"tenant:{tenant}", "tokens per minute")],
                    retry_after=max(0.1, -level / bucket.rate + 0.1),
                    metadata={"tenant": tenant},
                )
        if q.tenant_max_concurrent_calls and (
            self._tenant_calls.get(tenant, 0) >= q.tenant_max_concurrent_calls
        ):
            raise QuotaExceeded(
                f"tenant {tenant!r} already has {q.tenant_max_concurrent_calls} calls running",
                reason="TENANT_CONCURRENCY_EXCEEDED",
                quota=[QuotaViolation(f"tenant:{tenant}", "concurrent calls")],
                metadata={"tenant": tenant},
            )
        try:
            if self._slots.locked():
                await asyncio.wait_for(self._slots.acquire(), q.admission_wait)
            else:
                await self._slots.acquire()  # free: no timer, no task for wait_for
        except TimeoutError:
            raise QuotaExceeded(
                f"the server is at its {q.max_concurrent_calls} concurrent calls",
                reason="SERVER_CONCURRENCY_EXCEEDED",
                quota=[QuotaViolation("server", "concurrent calls")],
            ) from None
        self._tenant_calls[tenant] = self._tenant_calls.get(tenant, 0) + 1

    def exit(self, call: Call) -> None:
        tenant = call.tenant
        self._slots.release()
        self._tenant_calls[tenant] -= 1
        if not self._tenant_calls[tenant]:
            del self._tenant_calls[tenant]
        if self._quotas.tenant_tokens_per_minute:
            bucket = self._buckets[tenant]
            bucket.refill()
            bucket.level -= call.progress.completion_tokens
