"""ReviewService: thin typed methods mapping proto to the review desk and back.

Refusals a caller can branch on (each with one `ErrorInfo`, domain
`tokenwire.dev`):

- UNAUTHENTICATED, as for RespondService: missing, malformed, duplicate or
  invalid credentials;
- PERMISSION_DENIED `REVIEWER_ROLE_REQUIRED`: ListReviews or DecideReview by
  a key without the reviewer role;
- NOT_FOUND `REVIEW_NOT_FOUND`: no such review, or another tenant's (the same
  answer, so ids leak nothing);
- INVALID_ARGUMENT `INVALID_REVIEW_REQUEST`: a field out of bounds, each named
  in `BadRequest`;
- FAILED_PRECONDITION `REVIEW_ALREADY_DECIDED`: the review left PENDING
  already (`state` in the metadata);
- UNAVAILABLE `AUDIT_UNAVAILABLE`: the decision's audit row could not be
  committed, so nothing changed;
- UNAVAILABLE `STORE_UNAVAILABLE`: the review store (Redis) cannot be reached;
- UNAVAILABLE `SERVER_DRAINING`: WatchReview on a server that is stopping
  (watch again; RetryInfo set).

Why one module: the four RPCs share one access rule (the caller's reviewer
role and tenant), one error table (above) and one mapping of reviews to
messages; apart, a reviewer check could be missed in one of them.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator
from typing import cast

import grpc
from google.protobuf import timestamp_pb2

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import review_pb2 as rpb
from tokenwire.v1 import review_pb2_grpc as rgrpc
from tokenwire_server.audit.store import AuditWriteError
from tokenwire_server.errors import FieldViolation, InvalidRequest, TokenwireError, abort
from tokenwire_server.interceptors.other_services import ServiceRegistry
from tokenwire_server.review.access import Caller, Context, ReviewAccess
from tokenwire_server.review.desk import AlreadyDecided, Draining, ReviewDesk
from tokenwire_server.review.model import Decision, Review, ReviewState

log = logging.getLogger("tokenwire_server.review")

REVIEW_SERVICE_NAME: str = rpb.DESCRIPTOR.services_by_name["ReviewService"].full_name
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_REVIEW_ID_CHARS = 128
MAX_REASON_CHARS = 1000
MAX_REPLACEMENT_BYTES = 1024 * 1024

_STATE_TO_PROTO = {
    ReviewState.PENDING: pb.REVIEW_STATE_PENDING,
    ReviewState.APPROVED: pb.REVIEW_STATE_APPROVED,
    ReviewState.REJECTED: pb.REVIEW_STATE_REJECTED,
    ReviewState.EDITED: pb.REVIEW_STATE_EDITED,
    ReviewState.EXPIRED: pb.REVIEW_STATE_EXPIRED,
}
_STATE_FROM_PROTO = {value: state for state, value in _STATE_TO_PROTO.items()}
_DECISIONS = {
    rpb.REVIEW_DECISION_APPROVE: Decision.APPROVE,
    rpb.REVIEW_DECISION_REJECT: Decision.REJECT,
    rpb.REVIEW_DECISION_EDIT: Decision.EDIT,
}


class ReviewNotFound(TokenwireError):
    """Unknown, or another tenant's: the same answer, so ids leak nothing."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "REVIEW_NOT_FOUND"


class ReviewerRoleRequired(TokenwireError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "REVIEWER_ROLE_REQUIRED"


class ReviewAlreadyDecided(TokenwireError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REVIEW_ALREADY_DECIDED"


class ServerDraining(TokenwireError):
    """The server is stopping: watch again (another replica, or this one restarted)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SERVER_DRAINING"
    retry_after = 1.0


class AuditUnavailable(TokenwireError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "AUDIT_UNAVAILABLE"
    retry_after = 1.0


def review_state(state: ReviewState) -> pb.ReviewState:
    """The proto value of a review state (for `Completed.review.state`)."""
    return _STATE_TO_PROTO[state]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def to_proto(review: Review, full: bool) -> rpb.Review:
    """The review as a caller may see it: `full` for a reviewer of its tenant;
    otherwise without the held text, the checks' violation messages, and who
    decided and why."""
    message = rpb.Review(
        review_id=review.review_id,
        response_id=review.response_id,
        tenant=review.tenant,
        state=_STATE_TO_PROTO[review.state],
        held=review.held,
        reasons=[rpb.EscalationReason(rule_id=r, description=d) for r, d in review.reasons],
        governed_text=review.governed_text if full else "",
        decided_text=review.decided_text or "",
        decided_sha256=review.decided_sha256,
        verdict=int(review.verdict),  # type: ignore[arg-type]
        checks=review.checks if full else [_without_messages(c) for c in review.checks],
        history=[
            rpb.ReviewEvent(
                state=_STATE_TO_PROTO[event.state],
                at=_timestamp(event.at),
                actor=event.actor if full else "",
                reason=event.reason if full else "",
            )
            for event in review.history
        ],
        model=review.model,
        model_version=review.model_version,
        policy_id=review.policy_id,
        policy_version=review.policy_version,
        labels=dict(review.labels),
        created_at=_timestamp(review.created_at),
        expires_at=_timestamp(review.expires_at),
    )
    return message


def _without_messages(check: pb.VerificationCheck) -> pb.VerificationCheck:
    """A check as a caller without the role sees it: a validator's messages may
    quote the held text, so only codes and spans are kept."""
    kept = pb.VerificationCheck()
    kept.CopyFrom(check)
    for violation in kept.violations:
        violation.message = ""
        violation.json_pointer = ""
    return kept


def _page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def _after_seq(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, _, seq = text.partition(":")
        if version != "v1" or not seq.isdigit():
            raise ValueError(text)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid(("page_token", "not a page token this server gave out")) from None


def _invalid(*violations: tuple[str, str]) -> InvalidRequest:
    return InvalidRequest(
        "; ".join(f"{f}: {d}" for f, d in violations),
        reason="INVALID_REVIEW_REQUEST",
        violations=[FieldViolation(f, d) for f, d in violations],
    )


def _review_id(value: str) -> str:
    if not value:
        raise _invalid(("review_id", "required"))
    if len(value) > MAX_REVIEW_ID_CHARS:
        raise _invalid(("review_id", f"at most {MAX_REVIEW_ID_CHARS} characters"))
    return value


class ReviewServicer(rgrpc.ReviewServiceServicer):
    def __init__(self, desk: ReviewDesk, access: ReviewAccess) -> None:
        self._desk = desk
        self._access = access

    def _reviewer(self, context: Context) -> Caller:
        caller = self._access.caller(context)
        if caller.reviewer is None:
            raise ReviewerRoleRequired(
                "this needs a key with the reviewer role for its tenant (role: reviewer in "
                "the keys file)"
            )
        return caller

    async def _visible(self, review_id: str, caller: Caller) -> Review:
        review = await self._desk.get(_review_id(review_id))
        if review is None or review.tenant != caller.tenant:
            raise ReviewNotFound("no such review", metadata={"reviewId": review_id})
        return review

    async def ListReviews(
        self, request: rpb.ListReviewsRequest, context: Context
    ) -> rpb.ListReviewsResponse:
        try:
            caller = self._reviewer(context)
            if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
                raise _invalid(
                    ("page_size", f"0 (the default, {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
                )
            if request.state not in (pb.REVIEW_STATE_UNSPECIFIED, *_STATE_FROM_PROTO):
                raise _invalid(("state", "a ReviewState, or UNSPECIFIED for every state"))
            size = request.page_size or DEFAULT_PAGE_SIZE
            state = _STATE_FROM_PROTO.get(request.state)
            found = await self._desk.page(
                caller.tenant, state, _after_seq(request.page_token), size + 1
            )
            page = found[:size]
            return rpb.ListReviewsResponse(
                reviews=[to_proto(review, full=True) for review in page],
                next_page_token=_page_token(page[-1].seq) if len(found) > size else "",
            )
        except TokenwireError as error:
            await abort(context, error)
            raise  # unreachable: abort raises

    async def GetReview(
        self, request: rpb.GetReviewRequest, context: Context
    ) -> rpb.GetReviewResponse:
        try:
            caller = self._access.caller(context)
            review = await self._visible(request.review_id, caller)
            return rpb.GetReviewResponse(review=to_proto(review, caller.reviewer is not None))
        except TokenwireError as error:
            await abort(context, error)
            raise

    async def DecideReview(
        self, request: rpb.DecideReviewRequest, context: Context
    ) -> rpb.DecideReviewResponse:
        try:
            caller = self._reviewer(context)
            assert caller.reviewer is not None
            decision, replacement, reason = _decision(request)
            review = await self._visible(request.review_id, caller)
            try:
                decided = await self._desk.decide(
                    review, caller.reviewer, decision, reason, replacement
                )
            except AlreadyDecided as already:
                raise ReviewAlreadyDecided(
                    f"the review is already {already.review.state.value}",
                    metadata={"reviewId": review.review_id, "state": already.review.state.value},
                ) from None
            except AuditWriteError:
                raise AuditUnavailable(
                    "the audit trail cannot be written; the review is unchanged"
                ) from None
            return rpb.DecideReviewResponse(review=to_proto(decided, full=True))
        except TokenwireError as error:
            await abort(context, error)
            raise

    async def WatchReview(
        self, request: rpb.WatchReviewRequest, context: Context
    ) -> AsyncIterator[rpb.WatchReviewResponse]:
        try:
            caller = self._access.caller(context)
            await self._visible(request.review_id, caller)
            full = caller.reviewer is not None
            async for review in self._desk.watch(request.review_id):
                yield rpb.WatchReviewResponse(review=to_proto(review, full))
        except Draining:
            await abort(context, ServerDraining("the server is stopping; watch again"))
        except TokenwireError as error:
            await abort(context, error)


def _decision(request: rpb.DecideReviewRequest) -> tuple[Decision, str | None, str]:
    problems: list[tuple[str, str]] = []
    decision = _DECISIONS.get(request.decision)
    if decision is None:
        problems.append(("decision", "APPROVE, REJECT or EDIT"))
    if not request.review_id:
        problems.append(("review_id", "required"))
    reason = request.reason.strip()
    if len(request.reason) > MAX_REASON_CHARS:
        problems.append(("reason", f"at most {MAX_REASON_CHARS} characters"))
    if decision in (Decision.REJECT, Decision.EDIT) and not reason:
        problems.append(("reason", f"required to {decision.value if decision else 'decide'}"))
    replacement = request.replacement_text
    if decision is Decision.EDIT:
        if not replacement:
            problems.append(("replacement_text", "required to edit"))
        elif len(replacement.encode()) > MAX_REPLACEMENT_BYTES:
            problems.append(("replacement_text", f"at most {MAX_REPLACEMENT_BYTES} bytes"))
    elif replacement:
        problems.append(("replacement_text", "only with EDIT"))
    if problems or decision is None:
        raise _invalid(*problems)
    return decision, replacement if decision is Decision.EDIT else None, reason


def add_review_service(desk: ReviewDesk, access: ReviewAccess, server: ServiceRegistry) -> None:
    # The generated function calls only the two registration methods a
    # ServiceRegistry has; its stub names the grpc server classes.
    registry = cast(grpc.aio.Server, server)
    rgrpc.add_ReviewServiceServicer_to_server(ReviewServicer(desk, access), registry)
