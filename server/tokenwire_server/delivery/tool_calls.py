"""Tool-call fragments on their way from a backend to the response: governed
per call, numbered densely, and decided at the end like text.

Each call's arguments pass through their own governance session (a JSON-aware
one, so a secret inside an argument string is redacted and the JSON stays
valid), because a call's arguments are one document: a rule that holds text
back to see whether a match continues must not mix two calls' bytes. Calls
are numbered in the order they began, whatever indices the upstream used, so
the stream's `ToolCallDelta.index` is always a call already begun or the
next one (the verification gate holds the stream to that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenwire_server.backends.base import new_tool_call_id
from tokenwire_server.domain import Action, ToolCallFragment, Verdict
from tokenwire_server.governance.policy import GovernanceSession


@dataclass(frozen=True, slots=True)
class GovernedFragment:
    """A fragment as it may be released: `id` and `name` on a call's first."""

    index: int
    arguments: str
    actions: tuple[Action, ...]
    id: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class ToolCallsDecision:
    """The governance decision over every call of the response."""

    verdict: Verdict
    blocked: bool
    review_required: bool
    #: The policy's refusal text when a call was blocked.
    refusal_text: str | None
    #: Calls whose final arguments governance rewrote at the end (position ->
    #: arguments); the verification gate states the divergence from the stream.
    rewritten: dict[int, str]


class ToolCallAssembly:
    """One response's tool calls while the backend forms them."""

    def __init__(self, open_session: Callable[[], GovernanceSession]) -> None:
        self._open_session = open_session
        #: The upstream's index -> the call's position in this response.
        self._positions: dict[int, int] = {}
        self._sessions: list[GovernanceSession] = []
        self._names: list[str] = []

    @property
    def halted(self) -> bool:
        """A call's governance decided to block: generation can stop."""
        return any(session.halted for session in self._sessions)

    def locate(self, fragment: ToolCallFragment) -> tuple[int, str]:
        """The position `fragment`'s call has (or will have) in this response,
        and the function it calls (named by a call's first fragment)."""
        position = self._positions.get(fragment.index)
        if position is None:
            return len(self._sessions), fragment.name
        return position, self._names[position]

    def push(self, fragment: ToolCallFragment) -> GovernedFragment | None:
        """The governed part of `fragment` that may be released now; None when
        governance holds all of it back and it opens no call."""
        position = self._positions.get(fragment.index)
        if position is None:
            position = self._positions[fragment.index] = len(self._sessions)
            self._sessions.append(self._open_session())
            self._names.append(fragment.name)
            arguments, actions = self._sessions[position].push(fragment.arguments)
            # A call's id and name leave with its first fragment, so a caller
            # sees which function is being called before its arguments form.
            return GovernedFragment(
                position,
                arguments,
                actions,
                fragment.id or new_tool_call_id(),
                fragment.name,
            )
        arguments, actions = self._sessions[position].push(fragment.arguments)
        if not arguments and not actions:
            return None
        return GovernedFragment(position, arguments, actions)

    def finish(self) -> tuple[list[GovernedFragment], ToolCallsDecision]:
        """What each call's governance still held, and the decision over all."""
        tails: list[GovernedFragment] = []
        verdict = Verdict.ALLOWED
        blocked = review_required = False
        refusal: str | None = None
        rewritten: dict[int, str] = {}
        for position, session in enumerate(self._sessions):
            tail, actions, decision = session.finish()
            if tail or actions:
                tails.append(GovernedFragment(position, tail, actions))
            if decision.text is not None and not decision.blocked:
                rewritten[position] = decision.text
            verdict = max(verdict, decision.verdict or Verdict.ALLOWED)
            review_required = review_required or decision.review_required
            if decision.blocked and not blocked:
                blocked, refusal = True, decision.text
        return tails, ToolCallsDecision(verdict, blocked, review_required, refusal, rewritten)
