"""Continuing a response another replica started: skip what it already released.

Governance is split-independent (a property test holds the streaming output
equal to the whole-text output for any token boundaries), so regenerating the
same tokens through a fresh session releases exactly the text the lost
replica logged. This wrapper swallows that prefix, checks it byte for byte
against the log (fail closed on any difference), and passes the rest on.
"""

from __future__ import annotations

from tokenwire_server.domain import Action
from tokenwire_server.errors import InternalError
from tokenwire_server.governance.policy import FinalDecision, GovernanceSession


class ReplayingSession(GovernanceSession):
    def __init__(self, inner: GovernanceSession, logged: bytes) -> None:
        self._inner = inner
        self._logged = logged
        self._seen = 0

    def _skip(self, text: str, actions: tuple[Action, ...]) -> tuple[str, tuple[Action, ...]]:
        if self._seen >= len(self._logged):
            return text, actions
        data = text.encode()
        take = min(len(data), len(self._logged) - self._seen)
        if data[:take] != self._logged[self._seen : self._seen + take]:
            raise InternalError(
                "regenerated text differs from the logged text; the response cannot continue",
                reason="REPLAY_MISMATCH",
            )
        self._seen += take
        rest = data[take:].decode()
        return rest, tuple(a for a in actions if a.start >= len(self._logged))

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        released = self._skip(*self._inner.push(text))
        self.halted = self._inner.halted
        return released

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        tail, actions, decision = self._inner.finish(complete)
        tail, actions = self._skip(tail, actions)
        if self._seen < len(self._logged):
            raise InternalError(
                "regenerated text is shorter than the logged text", reason="REPLAY_MISMATCH"
            )
        return tail, actions, decision
