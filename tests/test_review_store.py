"""Review stores (SQLite and a real redis-server) and the review desk: opening,
deciding once, expiry, watching, audit rows, metrics, and a restart."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_SERVER, RedisServer
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit import commands as audit_commands
from tokenwire_server.audit.records import AuditRecord
from tokenwire_server.audit.review_events import review_row
from tokenwire_server.audit.store import (
    AuditStore,
    AuditWriteError,
    SqliteAuditStore,
    read_history,
)
from tokenwire_server.domain import Verdict
from tokenwire_server.governance.escalation import EscalationAction, EscalationDecision
from tokenwire_server.observability.metrics import Metrics
from tokenwire_server.reload import LoadError
from tokenwire_server.review import open_review_store, review_path_beside
from tokenwire_server.review.desk import AlreadyDecided, ReviewDesk
from tokenwire_server.review.model import (
    Decision,
    OpenReview,
    Review,
    Reviewer,
    ReviewState,
)
from tokenwire_server.review.redis_store import RedisReviewStore
from tokenwire_server.review.store import ReviewStore, SqliteReviewStore

HOLD = EscalationDecision(EscalationAction.HOLD, (("advice", "validator c: escalate"),), 3600)
AFTER = EscalationDecision(EscalationAction.REVIEW_AFTER, (("cards", "detected CARD"),), 3600)
ALICE = Reviewer("acme", "alice")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def opening(response_id: str = "rsp-1", **fields: Any) -> OpenReview:
    fields.setdefault("tenant", "acme")
    fields.setdefault("decision", HOLD)
    fields.setdefault("governed_text", "Buy 100 shares of ACME now.")
    fields.setdefault("verdict", Verdict.ALLOWED)
    fields.setdefault(
        "checks",
        (pb.VerificationCheck(name="validator:c", outcome=pb.CHECK_OUTCOME_ESCALATED),),
    )
    fields.setdefault("model", "tokenwire-sim")
    fields.setdefault("policy_id", "acme")
    fields.setdefault("policy_version", "7")
    fields.setdefault("labels", {"risk": "high"})
    fields.setdefault("request_id", "req-1")
    return OpenReview(response_id=response_id, **fields)


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], ReviewStore]]:
    """Opens stores on one backing store: SQLite file, or one real redis-server
    (two stores on it are two replicas)."""
    opened: list[ReviewStore] = []
    redis: RedisServer | None = None
    if request.param == "redis":
        if REDIS_SERVER is None:
            pytest.skip("needs Debian's redis-server (apt-get install redis-server; .ci/run does)")
        redis = RedisServer(tmp_path)
        await redis.start()

    def make() -> ReviewStore:
        store: ReviewStore
        if redis is not None:
            store = RedisReviewStore(redis.url)
        else:
            store = SqliteReviewStore(tmp_path / "reviews.sqlite3")
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
    if redis is not None:
        await redis.kill()


async def desk_on(store: ReviewStore, clock: Clock | None = None, **kwargs: Any) -> ReviewDesk:
    return ReviewDesk(store, clock=clock or Clock(), **kwargs)


# ---------------------------------------------------------------------- stores


async def test_open_is_pending_and_once_per_response(make_store: Callable[[], ReviewStore]) -> None:
    clock = Clock()
    desk = await desk_on(make_store(), clock)
    review = await desk.open(opening())
    assert review.state is ReviewState.PENDING and review.held and review.seq > 0
    assert review.expires_at == clock.now + 3600 and review.created_at == clock.now
    assert review.reasons == (("advice", "validator c: escalate"),)
    assert review.history[0].state is ReviewState.PENDING
    assert review.history[0].actor == "tokenwire"
    assert review.decided_text is None and review.decided_sha256 == ""
    again = await desk.open(opening(governed_text="other"))
    assert again.review_id == review.review_id and again.governed_text == review.governed_text
    stored = await desk.get(review.review_id)
    assert stored == review
    assert stored is not None and stored.checks[0].name == "validator:c"
    assert await desk.get("rev-unknown") is None


async def test_pages_are_per_tenant_and_state_oldest_first(
    make_store: Callable[[], ReviewStore],
) -> None:
    desk = await desk_on(make_store())
    acme = [await desk.open(opening(f"a{i}")) for i in range(5)]
    await desk.open(opening("g1", tenant="globex"))
    first = await desk.page("acme", None, 0, 2)
    assert [r.response_id for r in first] == ["a0", "a1"]
    rest = await desk.page("acme", None, first[-1].seq, 10)
    assert [r.response_id for r in rest] == ["a2", "a3", "a4"]
    await desk.decide(acme[1], ALICE, Decision.APPROVE, "")
    pending = await desk.page("acme", ReviewState.PENDING, 0, 10)
    assert [r.response_id for r in pending] == ["a0", "a2", "a3", "a4"]
    approved = await desk.page("acme", ReviewState.APPROVED, 0, 10)
    assert [r.response_id for r in approved] == ["a1"]
    assert [r.response_id for r in await desk.page("globex", None, 0, 10)] == ["g1"]
    assert await desk.page("initech", None, 0, 10) == []


async def test_a_pending_page_refills_what_expired_on_the_way(
    make_store: Callable[[], ReviewStore],
) -> None:
    clock = Clock()
    desk = await desk_on(make_store(), clock)
    for name, seconds in (("r1", 3600), ("r2", 10), ("r3", 3600), ("r4", 3600)):
        await desk.open(opening(name, decision=replace(HOLD, expire_after=seconds)))
    clock.now += 11
    page = await desk.page("acme", ReviewState.PENDING, 0, 3)
    assert [r.response_id for r in page] == ["r1", "r3", "r4"]
    expired = await desk.page("acme", ReviewState.EXPIRED, 0, 10)
    assert [r.response_id for r in expired] == ["r2"]


async def test_a_review_is_decided_once_whoever_races(
    make_store: Callable[[], ReviewStore],
) -> None:
    replicas = [await desk_on(make_store()) for _ in range(2)]
    review = await replicas[0].open(opening())
    outcomes = await asyncio.gather(
        *(
            replicas[i % 2].decide(review, Reviewer("acme", f"r{i}"), Decision.APPROVE, "")
            for i in range(8)
        ),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, Review)]
    lost = [o for o in outcomes if isinstance(o, AlreadyDecided)]
    assert len(won) == 1 and len(lost) == 7
    assert all(o.review.state is ReviewState.APPROVED for o in lost)
    stored = await replicas[1].get(review.review_id)
    assert stored is not None and stored.history[-1].actor == won[0].history[-1].actor


async def test_pending_reviews_survive_a_restart(make_store: Callable[[], ReviewStore]) -> None:
    first = make_store()
    review = await (await desk_on(first)).open(opening())
    await first.close()
    again = await desk_on(make_store())
    stored = await again.get(review.review_id)
    assert stored is not None and stored.state is ReviewState.PENDING
    decided = await again.decide(stored, ALICE, Decision.EDIT, "softened", "Consider options.")
    assert decided.decided_text == "Consider options."


async def test_expiry_by_reading_and_by_the_sweeper(make_store: Callable[[], ReviewStore]) -> None:
    clock = Clock()
    desk = await desk_on(make_store(), clock)
    read_later = await desk.open(opening("r1"))
    swept = await desk.open(opening("r2", decision=replace(HOLD, expire_after=10)))
    decided = await desk.open(opening("r3", decision=replace(HOLD, expire_after=10)))
    await desk.decide(decided, ALICE, Decision.REJECT, "no")
    clock.now += 11
    assert await desk.store.due(clock.now, 10) == [swept.review_id]
    assert await desk.sweep() == 1
    stored = await desk.store.get(swept.review_id)
    assert stored is not None and stored.state is ReviewState.EXPIRED
    assert stored.decided_text is None and stored.history[-1].actor == "tokenwire"
    clock.now += 3600
    expired = await desk.get(read_later.review_id)
    assert expired is not None and expired.state is ReviewState.EXPIRED
    with pytest.raises(AlreadyDecided) as raised:
        await desk.decide(read_later, ALICE, Decision.APPROVE, "")
    assert raised.value.review.state is ReviewState.EXPIRED


async def test_a_decision_after_the_expiry_time_finds_it_expired(
    make_store: Callable[[], ReviewStore],
) -> None:
    clock = Clock()
    desk = await desk_on(make_store(), clock)
    review = await desk.open(opening())
    clock.now = review.expires_at
    with pytest.raises(AlreadyDecided) as raised:
        await desk.decide(review, ALICE, Decision.APPROVE, "")
    assert raised.value.review.state is ReviewState.EXPIRED


async def test_a_watcher_sees_a_decision_made_on_another_replica(
    make_store: Callable[[], ReviewStore],
) -> None:
    here = await desk_on(make_store())
    # Another replica: Redis shares one store; SQLite serves one process, so the
    # other desk shares its store (another process on the file: the next test).
    there = await desk_on(make_store() if isinstance(here.store, RedisReviewStore) else here.store)
    review = await here.open(opening())
    seen: list[Review] = []

    async def watch() -> None:
        async for state in here.watch(review.review_id):
            seen.append(state)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await there.decide(review, ALICE, Decision.APPROVE, "fine")
    await asyncio.wait_for(watcher, 5)
    assert [r.state for r in seen] == [ReviewState.PENDING, ReviewState.APPROVED]
    assert seen[-1].decided_text == review.governed_text
    # Woken by the decision (in process, or Redis pub/sub), not by the poll interval.
    assert loop.time() - started < min(1.0, here.store.poll_interval)


async def test_a_decision_by_another_process_on_the_file_is_seen_by_polling(
    tmp_path: Path,
) -> None:
    here, there = SqliteReviewStore(tmp_path / "r.db"), SqliteReviewStore(tmp_path / "r.db")
    here.poll_interval = 0.2
    review = await ReviewDesk(here).open(opening())
    watching = asyncio.create_task(_states(ReviewDesk(here), review.review_id))
    await asyncio.sleep(0.1)
    await ReviewDesk(there).decide(review, ALICE, Decision.REJECT, "no")
    assert await asyncio.wait_for(watching, 3) == [ReviewState.PENDING, ReviewState.REJECTED]
    await here.close()
    await there.close()


async def _states(desk: ReviewDesk, review_id: str) -> list[ReviewState]:
    return [r.state async for r in desk.watch(review_id)]


async def test_a_watcher_sees_the_expiry_when_it_comes(
    make_store: Callable[[], ReviewStore],
) -> None:
    desk = ReviewDesk(make_store())  # real time: the watcher waits for the expiry
    review = await desk.open(opening(decision=replace(HOLD, expire_after=0.3)))
    states = [r.state async for r in desk.watch(review.review_id)]
    assert states == [ReviewState.PENDING, ReviewState.EXPIRED]


async def test_watching_a_decided_review_yields_it_once(
    make_store: Callable[[], ReviewStore],
) -> None:
    desk = await desk_on(make_store())
    review = await desk.open(opening())
    await desk.decide(review, ALICE, Decision.REJECT, "not advice we give")
    states = [r async for r in desk.watch(review.review_id)]
    assert [r.state for r in states] == [ReviewState.REJECTED]
    assert [r async for r in desk.watch("rev-unknown")] == []


def test_the_default_review_file_sits_beside_the_audit_file(tmp_path: Path) -> None:
    assert review_path_beside(":memory:") == ":memory:"
    assert review_path_beside(str(tmp_path / "audit.db")) == str(tmp_path / "audit.reviews.sqlite3")
    store = open_review_store("memory", "", str(tmp_path / "audit.db"))
    assert isinstance(store, SqliteReviewStore)
    assert store.path == str(tmp_path / "audit.reviews.sqlite3")
    asyncio.run(store.close())


async def test_a_file_that_is_not_a_review_store_is_refused(tmp_path: Path) -> None:
    audit = SqliteAuditStore(tmp_path / "audit.db")
    await audit.close()
    with pytest.raises(LoadError, match=r"review_path: .*not a review store"):
        open_review_store("memory", str(tmp_path / "audit.db"), "")


# ------------------------------------------------------- audit rows and metrics


class FailingAudit(AuditStore):
    async def record(self, record: AuditRecord) -> None:
        raise AuditWriteError("disk full")

    def record_nowait(self, record: AuditRecord) -> Future[None]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def test_every_step_is_an_audit_row_and_a_metric(tmp_path: Path) -> None:
    audit = SqliteAuditStore(tmp_path / "audit.db")
    metrics = Metrics()
    clock = Clock()
    desk = ReviewDesk(SqliteReviewStore(":memory:"), audit, metrics, clock=clock)
    held = await desk.open(opening("rsp-held"))
    await desk.open(opening("rsp-after", decision=AFTER))
    await desk.decide(held, ALICE, Decision.EDIT, "call +1 415-555-0134 for advice", "Edited.")
    clock.now += 7200
    await desk.sweep()
    await desk.aclose()
    await audit.close()
    rows = read_history(str(tmp_path / "audit.db"), "rsp-held")
    assert [(r["event"], r["status"], r["verdict"]) for r in rows] == [
        ("escalated", "OK", "allowed"),
        ("reviewed", "OK", "edited"),
    ]
    escalated, reviewed = rows
    assert escalated["tenant"] == "acme" and escalated["method"] == "escalation"
    assert escalated["actions"][0]["review_id"] == held.review_id
    assert escalated["actions"][0]["held"] is True
    assert escalated["actions"][0]["rules"] == ["advice"]
    assert escalated["labels"] == {"risk": "high"} and escalated["request_id"] == "req-1"
    detail = reviewed["actions"][0]
    assert (detail["actor"], detail["decision"]) == ("alice", "edit")
    assert detail["reason"] == "call [PHONE] for advice"  # scrubbed: reasons are free text
    assert reviewed["method"] == "/tokenwire.v1.ReviewService/DecideReview"
    assert reviewed["final_sha256"] == replace(held, decided_text="Edited.").decided_sha256
    assert "Edited." not in json.dumps(rows) and held.governed_text not in json.dumps(rows)
    expired = read_history(str(tmp_path / "audit.db"), "rsp-after")[-1]
    assert (expired["event"], expired["verdict"], expired["method"]) == (
        "reviewed",
        "expired",
        "expiry",
    )
    assert expired["actions"][0]["actor"] == "tokenwire"
    path = str(tmp_path / "audit.db")
    for argv, expected in (
        (["show", "rsp-held", "--audit-path", path], '"decision": "edit"'),
        (["verify", path], "intact"),
    ):
        parser = argparse.ArgumentParser()
        audit_commands.add_arguments(parser)
        out, err = io.StringIO(), io.StringIO()
        assert audit_commands.run(parser.parse_args(argv), out, err) == 0, err.getvalue()
        assert expected in out.getvalue(), out.getvalue()
    sample = metrics.registry.get_sample_value
    assert sample("tokenwire_reviews_opened_total", {"action": "hold"}) == 1
    assert sample("tokenwire_reviews_opened_total", {"action": "review_after"}) == 1
    assert sample("tokenwire_review_decisions_total", {"state": "edited"}) == 1
    assert sample("tokenwire_review_decisions_total", {"state": "expired"}) == 1


async def test_a_stale_copy_writes_nothing_and_a_lost_race_an_aborted_row(
    tmp_path: Path,
) -> None:
    audit = SqliteAuditStore(tmp_path / "audit.db")
    desk = ReviewDesk(SqliteReviewStore(":memory:"), audit, clock=Clock())
    review = await desk.open(opening())
    await desk.decide(review, ALICE, Decision.APPROVE, "")
    with pytest.raises(AlreadyDecided):  # decided since this copy was read: no row
        await desk.decide(review, Reviewer("acme", "bob"), Decision.REJECT, "late")
    raced = await desk.open(opening("rsp-2"))
    outcomes = await asyncio.gather(
        desk.decide(raced, ALICE, Decision.APPROVE, ""),
        desk.decide(raced, Reviewer("acme", "bob"), Decision.REJECT, "no"),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["AlreadyDecided", "Review"]
    await desk.aclose()
    await audit.close()
    rows = read_history(str(tmp_path / "audit.db"), "rsp-1")
    assert [(r["event"], r["status"]) for r in rows] == [("escalated", "OK"), ("reviewed", "OK")]
    rows = read_history(str(tmp_path / "audit.db"), "rsp-2")
    assert [(r["event"], r["status"], r["error_reason"]) for r in rows] == [
        ("escalated", "OK", ""),
        ("reviewed", "OK", ""),
        ("reviewed", "OK", ""),
        ("reviewed", "ABORTED", "REVIEW_ALREADY_DECIDED"),
    ]
    winner = next(o for o in outcomes if isinstance(o, Review))
    aborted = rows[-1]
    assert aborted["verdict"] == winner.state.value  # the state that took effect
    assert aborted["actions"][0]["actor"] != winner.history[-1].actor


async def test_without_its_audit_row_a_decision_does_not_take_effect() -> None:
    store = SqliteReviewStore(":memory:")
    metrics = Metrics()
    opened = await ReviewDesk(store, clock=Clock()).open(opening())
    desk = ReviewDesk(store, FailingAudit(), metrics, clock=Clock())
    with pytest.raises(AuditWriteError):
        await desk.decide(opened, ALICE, Decision.APPROVE, "")
    stored = await store.get(opened.review_id)
    assert stored is not None and stored.state is ReviewState.PENDING
    assert metrics.registry.get_sample_value("tokenwire_audit_write_failures_total") == 1
    with pytest.raises(AuditWriteError):  # and an escalation without its row fails closed
        await desk.open(opening("rsp-2"))
    await store.close()


async def test_audit_show_prints_entries_of_any_kind(tmp_path: Path) -> None:
    """A row whose actions are not governance actions (a review's, a check's
    summary) is shown as JSON rather than breaking `tokenwire audit show`."""
    audit = SqliteAuditStore(tmp_path / "audit.db")
    summary = {"check": "validator:c", "outcome": "pass", "latency_ms": 0.4}
    await audit.record(
        review_row(
            event="completed", method="m", response_id="rsp-x", tenant="acme", detail=summary
        )
    )
    await audit.close()
    parser = argparse.ArgumentParser()
    audit_commands.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    args = parser.parse_args(["show", "rsp-x", "--audit-path", str(tmp_path / "audit.db")])
    assert audit_commands.run(args, out, err) == 0, err.getvalue()
    assert '"check": "validator:c"' in out.getvalue()
