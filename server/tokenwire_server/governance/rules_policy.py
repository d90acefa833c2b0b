"""A policy built from rules: streaming redaction and blocking, whole-text checks, flags.

Per response the session runs every token through one `RedactionSession`
(redaction and stream-scope block rules share its hold-back logic, so a
blocked term is never released either). At the end, final-scope block rules
and flag rules look at the whole governed text.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from tokenwire_server.domain import Action, Operator, Verdict, utf8_length
from tokenwire_server.governance.detectors import MATCH_BUDGET_SECONDS
from tokenwire_server.governance.policy import FinalDecision, GovernanceSession, Policy
from tokenwire_server.governance.redaction import TIMEOUT_ENTITY, Redactor

BLOCK_ENTITY = "POLICY_BLOCK"
FLAG_ENTITY = "REVIEW"


@dataclass(frozen=True, slots=True)
class TextRule:
    """A block (final scope) or flag rule evaluated on the whole final text."""

    rule_id: str
    pattern: regex.Pattern[str]
    entity_type: str


class RulesPolicy(Policy):
    def __init__(
        self,
        *,
        policy_id: str,
        policy_version: str,
        redactor: Redactor,
        final_blocks: tuple[TextRule, ...],
        flags: tuple[TextRule, ...],
        refusal_text: str,
        token_events: bool,
    ) -> None:
        self.policy_id = policy_id
        self.policy_version = policy_version
        self.redactor = redactor
        self.final_blocks = final_blocks
        self.flags = flags
        self.refusal_text = refusal_text
        self.token_events = token_events

    def open_session(self) -> GovernanceSession:
        return _RulesSession(self)


class _RulesSession(GovernanceSession):
    __slots__ = ("_actions", "_policy", "_redaction", "_released", "halted")

    def __init__(self, policy: RulesPolicy) -> None:
        self._policy = policy
        self._redaction = policy.redactor.session()
        self._released: list[str] = []
        self._actions: list[Action] = []
        self.halted = False

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        released, actions = self._redaction.push(text)
        if released:
            self._released.append(released)
        if actions:
            self._actions.extend(actions)
        if self._redaction.halted:
            self.halted = True
        return released, actions

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        tail, tail_actions = self._redaction.flush(complete)
        self._released.append(tail)
        self._actions.extend(tail_actions)
        final = "".join(self._released)
        flags = tuple(self._text_actions(final, self._policy.flags, Operator.FLAG))
        blocker = self._redaction.blocked_by
        block_rule = blocker.rule_id if blocker is not None else None
        if block_rule is None:
            block_rule = next(
                (rule.rule_id for rule in self._policy.final_blocks if _found_in(rule, final)),
                None,
            )
        if block_rule is not None:
            refusal = self._policy.refusal_text
            action = Action(block_rule, BLOCK_ENTITY, Operator.BLOCK, 0, utf8_length(refusal))
            return (
                tail,
                tail_actions,
                FinalDecision(
                    verdict=Verdict.BLOCKED,
                    text=refusal,
                    actions=(action,),
                    review_required=bool(flags),
                    blocked=True,
                ),
            )
        verdict = Verdict.REDACTED if self._actions else Verdict.ALLOWED
        return (
            tail,
            tail_actions,
            FinalDecision(
                verdict=verdict,
                actions=(*self._actions, *flags),
                review_required=bool(flags),
            ),
        )

    @staticmethod
    def _text_actions(text: str, rules: tuple[TextRule, ...], operator: Operator) -> list[Action]:
        """Flags over the whole text; a rule out of time flags the whole text
        (fail closed: a person looks at what could not be checked)."""
        actions = []
        for rule in rules:
            try:
                matches = list(rule.pattern.finditer(text, timeout=MATCH_BUDGET_SECONDS))
            except TimeoutError:
                actions.append(Action(rule.rule_id, TIMEOUT_ENTITY, operator, 0, utf8_length(text)))
                continue
            for match in matches:
                start = utf8_length(text[: match.start()])
                end = start + utf8_length(match.group())
                actions.append(Action(rule.rule_id, rule.entity_type, operator, start, end))
        return actions


def _found_in(rule: TextRule, text: str) -> bool:
    """A final-scope block rule that runs out of time blocks: it could not clear the text."""
    try:
        return rule.pattern.search(text, timeout=MATCH_BUDGET_SECONDS) is not None
    except TimeoutError:
        return True
