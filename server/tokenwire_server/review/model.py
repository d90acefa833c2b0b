"""A response in human review, as the review stores keep it.

A review is created PENDING by an escalation (`OpenReview`) and leaves
PENDING exactly once: a reviewer's decision (APPROVED, REJECTED, EDITED) or
its expiry (EXPIRED; for a held response a rejection). `seq` orders a
tenant's reviews for listing and paging; stores assign it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from google.protobuf import json_format

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import Verdict
from tokenwire_server.governance.escalation import EscalationDecision

#: The actor of what the server does by itself (the escalation, an expiry).
SERVER_ACTOR = "tokenwire"


class ReviewState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EDITED = "edited"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self is not ReviewState.PENDING


class Decision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"

    @property
    def state(self) -> ReviewState:
        return _DECIDED[self]


_DECIDED = {
    Decision.APPROVE: ReviewState.APPROVED,
    Decision.REJECT: ReviewState.REJECTED,
    Decision.EDIT: ReviewState.EDITED,
}


@dataclass(frozen=True, slots=True)
class ReviewEvent:
    """One step of a review's life: the state it entered, when, who, why."""

    state: ReviewState
    at: float
    actor: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reviewer:
    """Who decides: taken from the caller's credential, never from a request."""

    tenant: str
    #: The key's `name` in the keys file, or `key:` and the start of its hash.
    name: str


@dataclass(frozen=True, slots=True)
class OpenReview:
    """What the response path hands over when an escalation rule matched."""

    response_id: str
    tenant: str
    decision: EscalationDecision
    #: The governed final text the reviewer decides on (for a hold: never released).
    governed_text: str
    verdict: Verdict = Verdict.ALLOWED
    #: `Completed.verification.checks` (integrity, validators).
    checks: Sequence[pb.VerificationCheck] = ()
    model: str = ""
    model_version: str = ""
    policy_id: str = ""
    policy_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    trace_id: str = ""


@dataclass(frozen=True, slots=True)
class Review:
    review_id: str
    response_id: str
    tenant: str
    state: ReviewState
    held: bool
    #: (escalation rule id, what matched).
    reasons: tuple[tuple[str, str], ...]
    governed_text: str
    #: What the decision released: the governed text (approved), the replacement
    #: (edited); None otherwise.
    decided_text: str | None
    verdict: Verdict
    checks: tuple[pb.VerificationCheck, ...]
    history: tuple[ReviewEvent, ...]
    model: str
    model_version: str
    policy_id: str
    policy_version: str
    labels: Mapping[str, str]
    created_at: float
    expires_at: float
    request_id: str = ""
    trace_id: str = ""
    seq: int = 0

    @property
    def decided_sha256(self) -> str:
        if self.decided_text is None:
            return ""
        return hashlib.sha256(self.decided_text.encode()).hexdigest()

    @property
    def decided_by(self) -> ReviewEvent | None:
        return self.history[-1] if self.state.terminal and self.history else None

    def expired_by(self, now: float) -> bool:
        return self.state is ReviewState.PENDING and now >= self.expires_at

    def decided(
        self, state: ReviewState, actor: str, reason: str, now: float, text: str | None
    ) -> Review:
        """This review after a decision or an expiry (a new value; stores swap it in)."""
        return replace(
            self,
            state=state,
            decided_text=text,
            history=(*self.history, ReviewEvent(state, now, actor, reason)),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "review_id": self.review_id,
                "response_id": self.response_id,
                "tenant": self.tenant,
                "state": self.state.value,
                "held": self.held,
                "reasons": [list(r) for r in self.reasons],
                "governed_text": self.governed_text,
                "decided_text": self.decided_text,
                "verdict": int(self.verdict),
                "checks": [json_format.MessageToDict(c) for c in self.checks],
                "history": [[e.state.value, e.at, e.actor, e.reason] for e in self.history],
                "model": self.model,
                "model_version": self.model_version,
                "policy_id": self.policy_id,
                "policy_version": self.policy_version,
                "labels": dict(self.labels),
                "created_at": self.created_at,
                "expires_at": self.expires_at,
                "request_id": self.request_id,
                "trace_id": self.trace_id,
                "seq": self.seq,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Review:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            review_id=data["review_id"],
            response_id=data["response_id"],
            tenant=data["tenant"],
            state=ReviewState(data["state"]),
            held=bool(data["held"]),
            reasons=tuple((str(r), str(d)) for r, d in data["reasons"]),
            governed_text=data["governed_text"],
            decided_text=data["decided_text"],
            verdict=Verdict(data["verdict"]),
            checks=tuple(json_format.ParseDict(c, pb.VerificationCheck()) for c in data["checks"]),
            history=tuple(
                ReviewEvent(ReviewState(s), float(at), str(actor), str(reason))
                for s, at, actor, reason in data["history"]
            ),
            model=data["model"],
            model_version=data["model_version"],
            policy_id=data["policy_id"],
            policy_version=data["policy_version"],
            labels=dict(data["labels"]),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            request_id=data.get("request_id", ""),
            trace_id=data.get("trace_id", ""),
            seq=int(data.get("seq", 0)),
        )
