"""ReviewService through the real server (in process, 127.0.0.1:0) and generated stubs:
reviewer roles from the keys file, tenant isolation, decisions, WatchReview, expiry,
a restart with pending reviews, replicas on a real Redis, and the audit rows.

The response path does not open reviews yet, so each test opens them the way it
will: `server.reviews.open(OpenReview(...))`."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import (
    REDIS_SERVER,
    RedisServer,
    RunningServer,
    StartServer,
    status_details,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import review_pb2 as rpb
from tokenwire.v1 import review_pb2_grpc as rgrpc
from tokenwire_server.audit.reader import read_history
from tokenwire_server.auth import Authenticator, KeysFileError, load_keys
from tokenwire_server.domain import Verdict
from tokenwire_server.governance.escalation import EscalationAction, EscalationDecision
from tokenwire_server.review.model import OpenReview, Review
from tokenwire_server.review.service import REVIEW_SERVICE_NAME

CALLER_A, REVIEWER_A = "tw-acme-caller-0123456789", "tw-acme-reviewer-0123456789"
REVIEWER_B = "tw-globex-reviewer-0123456789"
HOLD = EscalationDecision(EscalationAction.HOLD, (("advice", "validator c: escalate"),), 3600)
TEXT = "Buy 100 shares of ACME before Friday."


def keys_file(path: Path) -> str:
    entries = [
        ("acme", CALLER_A, "acme-app", None),
        ("acme", REVIEWER_A, "alice", "reviewer"),
        ("globex", REVIEWER_B, "gary", "reviewer"),
    ]
    lines = ["keys:"]
    for tenant, key, name, role in entries:
        lines.append(f"  - tenant: {tenant}")
        lines.append(f"    sha256: {hashlib.sha256(key.encode()).hexdigest()}")
        lines.append(f"    name: {name}")
        if role:
            lines.append(f"    role: {role}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class Reviews:
    """A server with keys, and ReviewService stubs for it."""

    def __init__(self, server: RunningServer, audit_path: str) -> None:
        self.server = server
        self.stub = rgrpc.ReviewServiceStub(server.channel)
        self.audit_path = audit_path

    async def open(self, response_id: str = "rsp-1", **fields: Any) -> Review:
        fields.setdefault("tenant", "acme")
        fields.setdefault("decision", HOLD)
        fields.setdefault("governed_text", TEXT)
        return await self.server.server.reviews.open(
            OpenReview(
                response_id=response_id,
                verdict=Verdict.ALLOWED,
                checks=(
                    pb.VerificationCheck(
                        name="validator:c",
                        outcome=pb.CHECK_OUTCOME_ESCALATED,
                        violations=[
                            pb.CheckViolation(
                                code="NUMERIC_ADVICE", message="quotes 'Buy 100'", start=0, end=7
                            )
                        ],
                    ),
                ),
                model="tokenwire-sim",
                policy_id="acme",
                policy_version="7",
                labels={"risk": "high"},
                **fields,
            )
        )

    async def get(self, review_id: str, key: str) -> rpb.Review:
        answer = await self.stub.GetReview(
            rpb.GetReviewRequest(review_id=review_id), metadata=bearer(key)
        )
        return answer.review

    async def decide(self, key: str, **fields: Any) -> rpb.Review:
        answer = await self.stub.DecideReview(
            rpb.DecideReviewRequest(**fields), metadata=bearer(key)
        )
        return answer.review


MakeReviews = Callable[..., Awaitable[Reviews]]


@pytest.fixture
def make_reviews(start_server: StartServer, tmp_path: Path) -> MakeReviews:
    async def make(**overrides: Any) -> Reviews:
        overrides.setdefault("auth_keys_file", keys_file(tmp_path / "keys.yaml"))
        overrides.setdefault("audit_path", str(tmp_path / "audit.db"))
        server = await start_server(**overrides)
        return Reviews(server, str(overrides["audit_path"]))

    return make


@pytest.fixture
async def reviews(make_reviews: MakeReviews) -> Reviews:
    return await make_reviews()


async def refused(call: Awaitable[Any]) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return status_details(raised.value)


# ------------------------------------------------------------------- the service


async def test_the_service_is_listed_and_serving(reviews: Reviews) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(reviews.server.channel)
    listing = [
        r
        async for r in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    names = {s.name for s in listing[0].list_services_response.service}
    assert REVIEW_SERVICE_NAME == "tokenwire.v1.ReviewService" and REVIEW_SERVICE_NAME in names
    health = health_pb2_grpc.HealthStub(reviews.server.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=REVIEW_SERVICE_NAME))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_credentials_are_required_like_everywhere(reviews: Reviews) -> None:
    request = rpb.GetReviewRequest(review_id="rev-x")
    details = await refused(reviews.stub.GetReview(request))
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.error_info.reason == "MISSING_CREDENTIALS"
    details = await refused(reviews.stub.GetReview(request, metadata=bearer("nope-0123456789")))
    assert details.error_info.reason == "INVALID_CREDENTIALS"
    details = await refused(
        reviews.stub.GetReview(request, metadata=(("authorization", REVIEWER_A),))
    )
    assert details.error_info.reason == "MALFORMED_CREDENTIALS"


async def test_listing_and_deciding_need_the_reviewer_role(reviews: Reviews) -> None:
    review = await reviews.open()
    for call in (
        reviews.stub.ListReviews(rpb.ListReviewsRequest(), metadata=bearer(CALLER_A)),
        reviews.stub.DecideReview(
            rpb.DecideReviewRequest(
                review_id=review.review_id, decision=rpb.REVIEW_DECISION_APPROVE
            ),
            metadata=bearer(CALLER_A),
        ),
    ):
        details = await refused(call)
        assert details.code == grpc.StatusCode.PERMISSION_DENIED
        assert details.error_info.reason == "REVIEWER_ROLE_REQUIRED"
    stored = await reviews.server.server.reviews.get(review.review_id)
    assert stored is not None and stored.state.value == "pending"


async def test_a_reviewer_lists_only_its_tenant_page_by_page(reviews: Reviews) -> None:
    opened = [await reviews.open(f"a{i}") for i in range(5)]
    await reviews.open("g1", tenant="globex")
    seen: list[str] = []
    token = ""
    while True:
        page = await reviews.stub.ListReviews(
            rpb.ListReviewsRequest(page_size=2, page_token=token), metadata=bearer(REVIEWER_A)
        )
        assert len(page.reviews) <= 2
        seen += [r.response_id for r in page.reviews]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["a0", "a1", "a2", "a3", "a4"]
    first = (
        await reviews.stub.ListReviews(rpb.ListReviewsRequest(), metadata=bearer(REVIEWER_A))
    ).reviews[0]
    assert first.governed_text == TEXT and first.held and first.state == pb.REVIEW_STATE_PENDING
    assert [(r.rule_id, r.description) for r in first.reasons] == [
        ("advice", "validator c: escalate")
    ]
    assert first.checks[0].name == "validator:c" and dict(first.labels) == {"risk": "high"}
    assert first.expires_at.ToSeconds() - first.created_at.ToSeconds() == 3600
    globex = await reviews.stub.ListReviews(rpb.ListReviewsRequest(), metadata=bearer(REVIEWER_B))
    assert [r.response_id for r in globex.reviews] == ["g1"]
    await reviews.decide(REVIEWER_A, review_id=opened[2].review_id, decision=1)
    pending = await reviews.stub.ListReviews(
        rpb.ListReviewsRequest(state=pb.REVIEW_STATE_PENDING), metadata=bearer(REVIEWER_A)
    )
    assert [r.response_id for r in pending.reviews] == ["a0", "a1", "a3", "a4"]
    approved = await reviews.stub.ListReviews(
        rpb.ListReviewsRequest(state=pb.REVIEW_STATE_APPROVED), metadata=bearer(REVIEWER_A)
    )
    assert [r.response_id for r in approved.reviews] == ["a2"]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 501}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"state": 42}, "state"),
    ],
)
async def test_bad_list_requests_name_the_field(
    reviews: Reviews, request_fields: dict[str, Any], field: str
) -> None:
    details = await refused(
        reviews.stub.ListReviews(
            rpb.ListReviewsRequest(**request_fields), metadata=bearer(REVIEWER_A)
        )
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "INVALID_REVIEW_REQUEST"
    assert [v.field for v in details.bad_request.field_violations] == [field]


async def test_another_tenants_review_is_not_found_like_an_unknown_one(reviews: Reviews) -> None:
    review = await reviews.open()
    answers = []
    for review_id in (review.review_id, "rev-does-not-exist"):
        for call in (
            reviews.stub.GetReview(
                rpb.GetReviewRequest(review_id=review_id), metadata=bearer(REVIEWER_B)
            ),
            reviews.stub.DecideReview(
                rpb.DecideReviewRequest(review_id=review_id, decision=1),
                metadata=bearer(REVIEWER_B),
            ),
            _first(
                reviews.stub.WatchReview(
                    rpb.WatchReviewRequest(review_id=review_id), metadata=bearer(REVIEWER_B)
                )
            ),
        ):
            details = await refused(call)
            metadata = dict(details.error_info.metadata)
            assert metadata.pop("reviewId") == review_id
            answers.append(
                (details.code, details.message, details.error_info.reason, sorted(metadata))
            )
    assert answers[:3] == answers[3:]
    assert answers[0][:3] == (grpc.StatusCode.NOT_FOUND, "no such review", "REVIEW_NOT_FOUND")
    stored = await reviews.server.server.reviews.get(review.review_id)
    assert stored is not None and stored.state.value == "pending"


async def _first(call: Any) -> Any:
    async for message in call:
        return message
    return None


async def test_the_caller_sees_the_state_but_not_the_held_text(reviews: Reviews) -> None:
    review = await reviews.open()
    mine = await reviews.get(review.review_id, CALLER_A)
    assert mine.state == pb.REVIEW_STATE_PENDING and mine.held
    assert mine.governed_text == "" and mine.decided_text == ""
    (violation,) = mine.checks[0].violations  # a validator's message may quote the text
    assert (violation.code, violation.start, violation.end, violation.message) == (
        "NUMERIC_ADVICE",
        0,
        7,
        "",
    )
    full = await reviews.get(review.review_id, REVIEWER_A)
    assert full.governed_text == TEXT and full.history[0].actor == "tokenwire"
    assert full.checks[0].violations[0].message == "quotes 'Buy 100'"
    await reviews.decide(
        REVIEWER_A,
        review_id=review.review_id,
        decision=rpb.REVIEW_DECISION_EDIT,
        replacement_text="Consider a diversified fund.",
        reason="no single-stock advice",
    )
    mine = await reviews.get(review.review_id, CALLER_A)
    assert mine.state == pb.REVIEW_STATE_EDITED
    assert mine.decided_text == "Consider a diversified fund." and mine.governed_text == ""
    assert mine.decided_sha256 == hashlib.sha256(b"Consider a diversified fund.").hexdigest()
    assert [(e.actor, e.reason) for e in mine.history] == [("", ""), ("", "")]
    full = await reviews.get(review.review_id, REVIEWER_A)
    assert [(e.state, e.actor, e.reason) for e in full.history][1] == (
        pb.REVIEW_STATE_EDITED,
        "alice",
        "no single-stock advice",
    )


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({}, ["decision"]),
        ({"decision": 9}, ["decision"]),
        ({"decision": 2}, ["reason"]),
        ({"decision": 3, "reason": "x"}, ["replacement_text"]),
        ({"decision": 3, "replacement_text": "y"}, ["reason"]),
        ({"decision": 1, "replacement_text": "y"}, ["replacement_text"]),
        ({"decision": 1, "reason": "r" * 1001}, ["reason"]),
        ({"decision": 3, "reason": "x", "replacement_text": "y" * (1024 * 1024 + 1)}, None),
        ({"decision": 1, "review_id": "r" * 129}, ["review_id"]),
    ],
)
async def test_bad_decisions_are_refused_and_change_nothing(
    reviews: Reviews, fields: dict[str, Any], violations: list[str] | None
) -> None:
    review = await reviews.open()
    details = await refused(
        reviews.stub.DecideReview(
            rpb.DecideReviewRequest(**{"review_id": review.review_id, **fields}),
            metadata=bearer(REVIEWER_A),
        )
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "INVALID_REVIEW_REQUEST"
    assert [v.field for v in details.bad_request.field_violations] == (
        violations or ["replacement_text"]
    )
    assert (await reviews.get(review.review_id, REVIEWER_A)).state == pb.REVIEW_STATE_PENDING


async def test_decisions_are_final_and_audited(reviews: Reviews) -> None:
    review = await reviews.open()
    approved = await reviews.decide(
        REVIEWER_A, review_id=review.review_id, decision=rpb.REVIEW_DECISION_APPROVE
    )
    assert approved.state == pb.REVIEW_STATE_APPROVED and approved.decided_text == TEXT
    details = await refused(
        reviews.stub.DecideReview(
            rpb.DecideReviewRequest(
                review_id=review.review_id, decision=rpb.REVIEW_DECISION_REJECT, reason="late"
            ),
            metadata=bearer(REVIEWER_A),
        )
    )
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.error_info.reason == "REVIEW_ALREADY_DECIDED"
    assert details.error_info.metadata["state"] == "approved"
    rows = read_history(reviews.audit_path, "rsp-1")
    assert [(r["event"], r["verdict"]) for r in rows] == [
        ("escalated", "allowed"),
        ("reviewed", "approved"),
    ]
    assert rows[1]["actions"][0]["actor"] == "alice" and rows[1]["tenant"] == "acme"
    metric = reviews.server.server.metrics.registry.get_sample_value(
        "tokenwire_review_decisions_total", {"state": "approved"}
    )
    assert metric == 1


async def test_watch_review_sees_the_decision_and_ends(reviews: Reviews) -> None:
    review = await reviews.open()
    watch = reviews.stub.WatchReview(
        rpb.WatchReviewRequest(review_id=review.review_id), metadata=bearer(CALLER_A)
    )
    first = await watch.read()
    assert first.review.state == pb.REVIEW_STATE_PENDING and first.review.governed_text == ""
    await reviews.decide(
        REVIEWER_A,
        review_id=review.review_id,
        decision=rpb.REVIEW_DECISION_APPROVE,
        reason="fine",
    )
    second = await asyncio.wait_for(watch.read(), 3)
    assert second.review.state == pb.REVIEW_STATE_APPROVED
    assert second.review.decided_text == TEXT  # the held payload, now released
    assert await asyncio.wait_for(watch.read(), 3) == grpc.aio.EOF
    assert await watch.code() == grpc.StatusCode.OK


async def test_an_unanswered_hold_expires_as_a_rejection(reviews: Reviews) -> None:
    review = await reviews.open(decision=replace(HOLD, expire_after=0.5))
    states = [
        (m.review.state, m.review.decided_text)
        async for m in reviews.stub.WatchReview(
            rpb.WatchReviewRequest(review_id=review.review_id), metadata=bearer(CALLER_A)
        )
    ]
    assert states == [(pb.REVIEW_STATE_PENDING, ""), (pb.REVIEW_STATE_EXPIRED, "")]
    details = await refused(
        reviews.stub.DecideReview(
            rpb.DecideReviewRequest(review_id=review.review_id, decision=1),
            metadata=bearer(REVIEWER_A),
        )
    )
    assert details.error_info.metadata["state"] == "expired"
    rows = read_history(reviews.audit_path, "rsp-1")
    assert [(r["event"], r["verdict"], r["method"]) for r in rows][-1] == (
        "reviewed",
        "expired",
        "expiry",
    )


async def test_a_drain_ends_watchers_at_once_so_they_watch_again(reviews: Reviews) -> None:
    review = await reviews.open()
    watch = reviews.stub.WatchReview(
        rpb.WatchReviewRequest(review_id=review.review_id), metadata=bearer(CALLER_A)
    )
    assert (await watch.read()).review.state == pb.REVIEW_STATE_PENDING
    loop = asyncio.get_running_loop()
    started = loop.time()
    draining = asyncio.create_task(reviews.server.server.drain(grace=30))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(watch.read(), 10)
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "SERVER_DRAINING" and details.retry_info is not None
    await asyncio.wait_for(draining, 10)
    assert loop.time() - started < 10  # not the 30 s grace


async def test_pending_reviews_survive_a_restart(make_reviews: MakeReviews, tmp_path: Path) -> None:
    path = str(tmp_path / "reviews.sqlite3")
    first = await make_reviews(review_path=path)
    review = await first.open()
    await first.server.server.drain(grace=0)
    second = await make_reviews(review_path=path, audit_path=str(tmp_path / "audit2.db"))
    again = await second.get(review.review_id, REVIEWER_A)
    assert again.state == pb.REVIEW_STATE_PENDING and again.governed_text == TEXT
    decided = await second.decide(
        REVIEWER_A, review_id=review.review_id, decision=rpb.REVIEW_DECISION_REJECT, reason="no"
    )
    assert decided.state == pb.REVIEW_STATE_REJECTED and decided.decided_text == ""


async def test_the_default_review_file_sits_beside_the_audit_file(
    make_reviews: MakeReviews, tmp_path: Path
) -> None:
    reviews = await make_reviews()
    await reviews.open()
    assert (tmp_path / "audit.reviews.sqlite3").is_file()


async def test_a_server_without_keys_reads_reviews_but_nobody_decides(
    start_server: StartServer,
) -> None:
    server = await start_server()
    stub = rgrpc.ReviewServiceStub(server.channel)
    review = await Reviews(server, ":memory:").open(tenant="")
    answer = await stub.GetReview(rpb.GetReviewRequest(review_id=review.review_id))
    assert answer.review.state == pb.REVIEW_STATE_PENDING and answer.review.governed_text == ""
    details = await refused(
        stub.DecideReview(rpb.DecideReviewRequest(review_id=review.review_id, decision=1))
    )
    assert details.error_info.reason == "REVIEWER_ROLE_REQUIRED"


async def test_a_malformed_request_is_invalid_argument(reviews: Reviews) -> None:
    call = reviews.server.channel.unary_unary(
        f"/{REVIEW_SERVICE_NAME}/GetReview",
        request_serializer=lambda body: body,
        response_deserializer=lambda body: body,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"\x0a\x05\xff\xfe\xfd\xfc\xfb", metadata=bearer(REVIEWER_A))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "MALFORMED_REQUEST"


@pytest.mark.skipif(REDIS_SERVER is None, reason="needs Debian's redis-server")
async def test_replicas_on_redis_share_reviews_and_wake_each_others_watchers(
    make_reviews: MakeReviews, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        one = await make_reviews(store=redis.url)
        two = await make_reviews(store=redis.url, audit_path=str(tmp_path / "audit2.db"))
        review = await one.open()
        watch = two.stub.WatchReview(
            rpb.WatchReviewRequest(review_id=review.review_id), metadata=bearer(CALLER_A)
        )
        assert (await watch.read()).review.state == pb.REVIEW_STATE_PENDING
        loop = asyncio.get_running_loop()
        started = loop.time()
        await one.decide(REVIEWER_A, review_id=review.review_id, decision=1)
        decided = await asyncio.wait_for(watch.read(), 5)
        assert decided.review.state == pb.REVIEW_STATE_APPROVED
        assert loop.time() - started < 1.0  # pub/sub, not the 2 s poll
        listed = await two.stub.ListReviews(rpb.ListReviewsRequest(), metadata=bearer(REVIEWER_A))
        assert [r.review_id for r in listed.reviews] == [review.review_id]
        await redis.kill()
        details = await refused(
            two.stub.GetReview(
                rpb.GetReviewRequest(review_id=review.review_id), metadata=bearer(REVIEWER_A)
            )
        )
        assert details.code == grpc.StatusCode.UNAVAILABLE
        assert details.error_info.reason == "STORE_UNAVAILABLE"
    finally:
        await redis.kill()


# -------------------------------------------------------------- roles in keys


def _keys(tmp_path: Path, extra: str) -> str:
    path = tmp_path / "keys.yaml"
    digest = hashlib.sha256(b"some-key-0123456789").hexdigest()
    path.write_text(f"keys:\n  - tenant: acme\n    sha256: {digest}\n{extra}")
    return str(path)


def test_keys_take_an_optional_role(tmp_path: Path) -> None:
    (plain,) = load_keys(_keys(tmp_path, ""))
    assert plain.roles == frozenset() and plain.label.startswith("key:")
    (one,) = load_keys(_keys(tmp_path, "    role: reviewer\n    name: alice\n"))
    assert one.roles == {"reviewer"} and one.label == "alice"
    (listed,) = load_keys(_keys(tmp_path, "    roles: [reviewer]\n"))
    assert listed.roles == {"reviewer"}
    found = Authenticator(_keys(tmp_path, "    role: reviewer\n")).identify("some-key-0123456789")
    assert found is not None and found.tenant == "acme" and "reviewer" in found.roles


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    role: admin\n", r"keys\[0\]: unknown role 'admin' \(known: reviewer\)"),
        ("    roles: reviewer\n", r"keys\[0\]: roles must be a list"),
        ("    role: reviewer\n    roles: [reviewer]\n", r"keys\[0\]: give role or roles"),
    ],
)
def test_bad_roles_are_refused_with_their_place(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(KeysFileError, match=message):
        load_keys(_keys(tmp_path, extra))
