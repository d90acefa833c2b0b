"""The governance interface and the pass-through policy.

A policy opens one session per response. The session sees generated text in
order (`push`) and returns only the text it releases, with the actions it
applied; text it still needs to look at stays inside it. `finish` returns the
final decision over the whole text, which may rewrite or block it (the
verification gate then reports the divergence from what was streamed).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from tokenwire_server.domain import Action, Verdict
from tokenwire_server.governance.escalation import NO_ESCALATION, EscalationRules

NO_ACTIONS: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class FinalDecision:
    """`text` None means the final payload is exactly the released text."""

    verdict: Verdict
    text: str | None = None
    actions: tuple[Action, ...] = NO_ACTIONS
    review_required: bool = False
    blocked: bool = False


class GovernanceSession(abc.ABC):
    #: True once the session has decided the response is blocked: generation can stop.
    halted: bool = False

    @abc.abstractmethod
    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        """Takes generated text; returns the text released now and its actions."""

    @abc.abstractmethod
    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        """Flushes held text (returned like `push`) and decides over the whole response.

        `complete`: the text ended where it was meant to (a JSON string its
        quote closed, a number its delimiter ended), so a fragment at its end
        is not a value the end cut off; only a key block missing its END line
        still counts as one. Otherwise (the end of a response) it is."""


class Policy(abc.ABC):
    policy_id: str
    policy_version: str
    #: Which responses a person reviews (the policy file's `escalation:` section).
    escalation: EscalationRules = NO_ESCALATION

    @abc.abstractmethod
    def open_session(self) -> GovernanceSession:
        """A fresh session for one response."""


class _PassThroughSession(GovernanceSession):
    __slots__ = ()

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        return text, NO_ACTIONS

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        return "", NO_ACTIONS, _ALLOWED


_ALLOWED = FinalDecision(verdict=Verdict.ALLOWED)
_PASS_THROUGH_SESSION = _PassThroughSession()


class PassThroughPolicy(Policy):
    """Releases every token at once and changes nothing, but still names itself."""

    policy_id = "pass-through"
    policy_version = "1"

    def open_session(self) -> GovernanceSession:
        return _PASS_THROUGH_SESSION
