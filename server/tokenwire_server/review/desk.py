"""The review desk: opening, deciding, expiring and watching reviews.

It sits on a `ReviewStore` and does what a store does not: the audit rows
(`escalated`, `reviewed`), the metrics, expiry (lazily when a review is read
or watched, and by a sweeper every `sweep_interval`, so a review nobody looks
at still expires on time) and the wake-ups of watchers.

The response path calls `open(OpenReview(...))` when an escalation rule
matched; ReviewService calls the rest. Tenant checks are the service's
(review/service.py): the desk trusts the review it is given.

Why one module: opening, deciding, expiring and watching share one rule
(a review leaves PENDING once, with its audit row and its metric), and the
expiry has three callers here (a read, a watcher, the sweeper).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from tokenwire_server.audit.review_events import ESCALATED, REVIEWED, review_row
from tokenwire_server.audit.store import AuditStore, AuditWriteError
from tokenwire_server.observability.metrics import Metrics
from tokenwire_server.observability.rate_limited_log import RateLimitedLog
from tokenwire_server.review.model import (
    SERVER_ACTOR,
    Decision,
    OpenReview,
    Review,
    Reviewer,
    ReviewEvent,
    ReviewState,
)
from tokenwire_server.review.store import KEEP_DECIDED, ReviewStore

log = logging.getLogger("tokenwire_server.review")

#: The audit `method` of rows the server writes by itself.
ESCALATION_METHOD = "escalation"
EXPIRY_METHOD = "expiry"
DECIDE_METHOD = "/tokenwire.v1.ReviewService/DecideReview"
#: Reviews expired per sweep (more wait for the next sweep).
SWEEP_BATCH = 200


class Draining(Exception):
    """The server is draining: a watcher should watch again on another replica."""


class AlreadyDecided(Exception):
    """The review left PENDING before this decision; `review` is how it stands."""

    def __init__(self, review: Review) -> None:
        super().__init__(f"review {review.review_id} is {review.state.value}")
        self.review = review


def _verdict_name(review: Review) -> str:
    return review.verdict.name.lower()


class ReviewDesk:
    def __init__(
        self,
        store: ReviewStore,
        audit: AuditStore | None = None,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 30.0,
        keep_decided: float = KEEP_DECIDED,
    ) -> None:
        self.store = store
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._keep_decided = keep_decided
        self._sweeper: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, interval=60.0)
        #: Set by `stop_watching` when the server drains.
        self._draining = asyncio.Event()

    # ---------------------------------------------------------------- opening

    async def open(self, request: OpenReview) -> Review:
        """A PENDING review of an escalated response (idempotent per response id).

        Awaited before the response's `Completed` leaves, whose `review` then
        names it. Raises `AuditWriteError` when the `escalated` row cannot be
        committed (the response path fails the call closed, as for any audit
        row) and `StoreUnavailable` when the store cannot be reached."""
        now = self._clock()
        decision = request.decision
        review = Review(
            review_id=f"rev-{uuid.uuid4().hex}",
            response_id=request.response_id,
            tenant=request.tenant,
            state=ReviewState.PENDING,
            held=decision.held,
            reasons=decision.reasons,
            governed_text=request.governed_text,
            decided_text=None,
            verdict=request.verdict,
            checks=tuple(request.checks),
            history=(
                ReviewEvent(
                    ReviewState.PENDING,
                    now,
                    SERVER_ACTOR,
                    "; ".join(f"{rule}: {what}" for rule, what in decision.reasons),
                ),
            ),
            model=request.model,
            model_version=request.model_version,
            policy_id=request.policy_id,
            policy_version=request.policy_version,
            labels=dict(request.labels),
            created_at=now,
            expires_at=now + decision.expire_after,
            request_id=request.request_id,
            trace_id=request.trace_id,
        )
        stored = await self.store.create(review)
        if stored.review_id != review.review_id:
            return stored  # opened before (a retried or resumed response)
        await self._record(
            stored,
            ESCALATED,
            ESCALATION_METHOD,
            final_sha256=_sha256(stored.governed_text),
            verdict=_verdict_name(stored),
            detail={
                "review_id": stored.review_id,
                "held": stored.held,
                "rules": [rule for rule, _ in stored.reasons],
                "expires_at_ns": int(stored.expires_at * 1e9),
            },
        )
        if self._metrics is not None:
            action = "hold" if stored.held else "review_after"
            self._metrics.reviews_opened.labels(action).inc()
        return stored

    # ---------------------------------------------------------------- reading

    async def get(self, review_id: str) -> Review | None:
        """The review as it stands now (expired first if its time has come)."""
        review = await self.store.get(review_id)
        if review is not None and review.expired_by(self._clock()):
            review = await self.expire(review)
        return review

    async def page(
        self, tenant: str, state: ReviewState | None, after_seq: int, limit: int
    ) -> list[Review]:
        """Up to `limit` of a tenant's reviews after `after_seq`, oldest first,
        expiries applied (a PENDING listing refills what expired on the way)."""
        now = self._clock()
        found: list[Review] = []
        while len(found) < limit:
            batch = await self.store.page(tenant, state, after_seq, limit - len(found))
            if not batch:
                break
            after_seq = batch[-1].seq
            for review in batch:
                if review.expired_by(now):
                    review = await self.expire(review)
                    if state is not None and review.state is not state:
                        continue
                found.append(review)
        return found

    async def watch(self, review_id: str) -> AsyncIterator[Review]:
        """The review now, then each change of state; ends after a terminal state
        (or when the review is gone). Wakes on decisions at once and at the
        expiry time, and re-reads every `store.poll_interval` besides. Raises
        `Draining` once `stop_watching` was called, so a drain does not wait
        its whole grace period for watchers."""
        last: ReviewState | None = None
        while True:
            if self._draining.is_set():
                raise Draining()
            with self.store.changes(review_id) as changed:
                review = await self.get(review_id)
                if review is None:
                    return
                if review.state is not last:
                    last = review.state
                    yield review
                if review.state.terminal:
                    return
                wait = min(self.store.poll_interval, max(0.0, review.expires_at - self._clock()))
                waits = (
                    asyncio.ensure_future(changed.wait()),
                    asyncio.ensure_future(self._draining.wait()),
                )
                try:
                    await asyncio.wait(
                        waits, timeout=wait + 0.001, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for pending in waits:
                        pending.cancel()

    def stop_watching(self) -> None:
        """The server drains: every watcher ends now (UNAVAILABLE, retry elsewhere)."""
        self._draining.set()

    # --------------------------------------------------------------- deciding

    async def decide(
        self,
        review: Review,
        reviewer: Reviewer,
        decision: Decision,
        reason: str,
        replacement_text: str | None = None,
    ) -> Review:
        """Applies a reviewer's decision to a PENDING review.

        The `reviewed` row is committed first (`AuditWriteError`: nothing
        changes); then the decision takes effect unless another one did first,
        which raises `AlreadyDecided` (and writes a second row, status
        ABORTED, saying this one did not take effect)."""
        review = await self.get(review.review_id) or review  # as it stands now, expiry applied
        if review.state.terminal:
            raise AlreadyDecided(review)
        now = self._clock()
        if decision is Decision.APPROVE:
            text: str | None = review.governed_text
        elif decision is Decision.EDIT:
            text = replacement_text or ""
        else:
            text = None
        decided = review.decided(decision.state, reviewer.name, reason, now, text)
        detail = {
            "review_id": review.review_id,
            "held": review.held,
            "actor": reviewer.name,
            "decision": decision.value,
            "reason": reason,
        }
        await self._record(
            decided,
            REVIEWED,
            DECIDE_METHOD,
            final_sha256=decided.decided_sha256,
            verdict=decided.state.value,
            detail=detail,
        )
        if not await self.store.settle(decided):
            current = await self.store.get(review.review_id) or review
            with contextlib.suppress(AuditWriteError):
                await self._record(
                    decided,
                    REVIEWED,
                    DECIDE_METHOD,
                    status="ABORTED",
                    error_reason="REVIEW_ALREADY_DECIDED",
                    verdict=current.state.value,
                    detail=detail,
                )
            raise AlreadyDecided(current)
        self._count(decided)
        return decided

    async def expire(self, review: Review) -> Review:
        """Expires a PENDING review whose time has come: EXPIRED, nothing released.
        Returns the review as it stands (someone may have decided it first)."""
        expired = review.decided(
            ReviewState.EXPIRED, SERVER_ACTOR, "nobody decided in time", self._clock(), None
        )
        if not await self.store.settle(expired):
            return await self.store.get(review.review_id) or review
        self._count(expired)
        # The expiry stands even without its row (it releases nothing); _record logged it.
        with contextlib.suppress(AuditWriteError):
            await self._record(
                expired,
                REVIEWED,
                EXPIRY_METHOD,
                verdict=ReviewState.EXPIRED.value,
                detail={
                    "review_id": review.review_id,
                    "held": review.held,
                    "actor": SERVER_ACTOR,
                    "decision": "expire",
                    "reason": "nobody decided in time",
                },
            )
        return expired

    def _count(self, review: Review) -> None:
        if self._metrics is not None:
            self._metrics.review_decisions.labels(review.state.value).inc()

    async def _record(
        self,
        review: Review,
        event: str,
        method: str,
        *,
        detail: dict[str, object],
        status: str = "OK",
        error_reason: str = "",
        verdict: str = "",
        final_sha256: str = "",
    ) -> None:
        if self._audit is None:
            return
        row = review_row(
            event=event,
            method=method,
            response_id=review.response_id,
            tenant=review.tenant,
            detail=detail,
            status=status,
            error_reason=error_reason,
            request_id=review.request_id,
            trace_id=review.trace_id,
            labels=review.labels,
            model=review.model,
            model_version=review.model_version,
            policy_id=review.policy_id,
            policy_version=review.policy_version,
            verdict=verdict,
            final_sha256=final_sha256,
            created_at_ns=int(review.created_at * 1e9),
        )
        try:
            await self._audit.record(row)
        except AuditWriteError:
            if self._metrics is not None:
                self._metrics.audit_write_failures.inc()
            raise

    # ---------------------------------------------------------------- sweeping

    async def sweep(self) -> int:
        """Expires every review whose time has come; forgets long-decided ones."""
        expired = 0
        for review_id in await self.store.due(self._clock(), SWEEP_BATCH):
            review = await self.store.get(review_id)
            if review is None or not review.expired_by(self._clock()):
                continue
            if (await self.expire(review)).state is ReviewState.EXPIRED:
                expired += 1
        await self.store.prune(self._clock() - self._keep_decided)
        return expired

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                await self.sweep()
            except Exception as error:  # an outage: the next sweep tries again
                self._log.log(logging.WARNING, "sweep", "review expiry sweep failed: %s", error)

    def start(self) -> None:
        """Starts the expiry sweeper (inside the event loop)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="review sweeper")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.store.close()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
