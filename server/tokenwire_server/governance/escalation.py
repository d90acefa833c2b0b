"""Escalation rules: which responses a person must review, and whether they are held.

A policy's `escalation:` section (parsed in policy_file.py) is a list of
rules. A rule matches a response when every condition it lists holds (within
a list, any element will do):

- `validator_outcome: [escalate, fail, error, timed_out, pass]`: a validator's
  check ended so (only the validators in `validators: [...]`, when given);
- `entity_types: [PAYMENT_CARD]`: governance detected one of them (the
  entity type of a redaction, block or flag action);
- `flags: [medical]`: one of these flag rules matched;
- `labels: {risk: high}`: the request carries every one of these labels;
- `models: [...]`, `tenants: [...]`: the response's model / tenant is one;
- `check_errored: true`: a check errored or timed out (`false`: none did);
- `diverged: true`: the final payload differs from what was streamed;
- `tools: [transfer_funds]`: the response called one of these tools.

Its `action` is `hold` (nothing of the text is released; the caller gets the
decided payload through ReviewService) or `review_after` (released, then
reviewed). When several rules match, hold wins, and the review expires after
the shortest `expire_after` of the matching rules with that action. A
validator that answers ESCALATE (or errs under `on_error = "escalate"`)
always goes to review: with no rule matching, as `review_after` under the
rule id `validator-escalation`.

Holding needs the text kept back from the start: `may_hold` tells, when a
response starts, whether a hold rule could still match it (its model, tenant
and label conditions hold, and, for a rule naming tools, the request offers
one of them: a model can only call what it was offered); the response path
then releases nothing before `decide_escalation` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

#: How long a review waits for a decision unless its rule says otherwise (24 h).
DEFAULT_EXPIRE_AFTER = 86_400.0
#: The longest a review may wait (30 days).
MAX_EXPIRE_AFTER = 30 * 86_400.0
#: The outcome words of a validator's check.
VALIDATOR_OUTCOMES = frozenset({"pass", "fail", "escalate", "error", "timed_out"})
#: The rule id of a validator's ESCALATE that no rule named.
VALIDATOR_ESCALATION = "validator-escalation"


class EscalationAction(StrEnum):
    #: Nothing of the text is released before a reviewer decides.
    HOLD = "hold"
    #: The text is released as usual and reviewed afterwards.
    REVIEW_AFTER = "review_after"


@dataclass(frozen=True, slots=True)
class EscalationFacts:
    """What is known about a response when it ends."""

    model: str = ""
    tenant: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Validator name -> pass | fail | escalate | error | timed_out (its check's outcome).
    validator_outcomes: Mapping[str, str] = field(default_factory=dict)
    #: Validators whose result, after their error rule, is ESCALATE.
    escalated_by: frozenset[str] = frozenset()
    #: Entity types of the governance actions (redactions, blocks, flags).
    entity_types: frozenset[str] = frozenset()
    #: Ids of the flag rules that matched.
    flag_rule_ids: frozenset[str] = frozenset()
    #: A check (a validator, or any other) errored or timed out.
    check_errored: bool = False
    #: The final payload differs from what was streamed.
    diverged: bool = False
    #: Names of the tools the response called.
    tool_names: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EscalationRule:
    rule_id: str
    action: EscalationAction
    expire_after: float = DEFAULT_EXPIRE_AFTER
    validator_outcomes: frozenset[str] = frozenset()
    validators: frozenset[str] = frozenset()
    entity_types: frozenset[str] = frozenset()
    flags: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    models: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    check_errored: bool | None = None
    diverged: bool | None = None
    tools: frozenset[str] = frozenset()

    def static_match(self, model: str, tenant: str, labels: Mapping[str, str]) -> bool:
        """The conditions known when a response starts hold."""
        return (
            (not self.models or model in self.models)
            and (not self.tenants or tenant in self.tenants)
            and all(labels.get(key) == value for key, value in self.labels)
        )

    def match(self, facts: EscalationFacts) -> str | None:
        """What matched, in a few words, or None when the rule does not match."""
        if not self.static_match(facts.model, facts.tenant, facts.labels):
            return None
        found: list[str] = []
        if self.validator_outcomes:
            hits = sorted(
                f"validator {name}: {word}"
                for name, word in facts.validator_outcomes.items()
                if word in self.validator_outcomes
                and (not self.validators or name in self.validators)
            )
            if not hits:
                return None
            found += hits
        if self.entity_types:
            entities = sorted(self.entity_types & facts.entity_types)
            if not entities:
                return None
            found.append(f"detected {', '.join(entities)}")
        if self.flags:
            flags = sorted(self.flags & facts.flag_rule_ids)
            if not flags:
                return None
            found.append(f"flag {', '.join(flags)}")
        if self.check_errored is not None:
            if facts.check_errored is not self.check_errored:
                return None
            found.append("a check errored" if self.check_errored else "no check errored")
        if self.diverged is not None:
            if facts.diverged is not self.diverged:
                return None
            found.append("diverged" if self.diverged else "not diverged")
        if self.tools:
            called = sorted(self.tools & facts.tool_names)
            if not called:
                return None
            found.append(f"called {', '.join(called)}")
        found += [f"label {key}={value}" for key, value in self.labels]
        if self.models:
            found.append(f"model {facts.model}")
        if self.tenants:
            found.append(f"tenant {facts.tenant}")
        return "; ".join(found)


@dataclass(frozen=True, slots=True)
class EscalationDecision:
    action: EscalationAction
    #: (rule id, what matched) for every rule that matched, in policy order.
    reasons: tuple[tuple[str, str], ...]
    #: Seconds a pending review waits before it expires (an expired hold is a rejection).
    expire_after: float

    @property
    def held(self) -> bool:
        return self.action is EscalationAction.HOLD

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(rule_id for rule_id, _ in self.reasons)


@dataclass(frozen=True, slots=True)
class EscalationRules:
    rules: tuple[EscalationRule, ...] = ()

    def may_hold(
        self,
        model: str,
        tenant: str,
        labels: Mapping[str, str],
        tools: Iterable[str] = (),
    ) -> bool:
        """At the start of a response: could a hold rule still match it? Then the
        response path must release nothing before the decision. `tools`: the
        names of the tools the request offers (a rule naming tools can only
        match when one of them is offered)."""
        offered = frozenset(tools)
        return any(
            rule.action is EscalationAction.HOLD
            and rule.static_match(model, tenant, labels)
            and (not rule.tools or not rule.tools.isdisjoint(offered))
            for rule in self.rules
        )

    def decide(self, facts: EscalationFacts) -> EscalationDecision | None:
        return decide_escalation(self.rules, facts)


NO_ESCALATION = EscalationRules()


def decide_escalation(
    rules: Iterable[EscalationRule], facts: EscalationFacts
) -> EscalationDecision | None:
    """The review a response needs, or None. Pure: the same facts, the same decision."""
    matched: list[tuple[EscalationRule, str]] = []
    for rule in rules:
        description = rule.match(facts)
        if description is not None:
            matched.append((rule, description))
    if not matched:
        if not facts.escalated_by:
            return None
        names = ", ".join(sorted(facts.escalated_by))
        return EscalationDecision(
            EscalationAction.REVIEW_AFTER,
            ((VALIDATOR_ESCALATION, f"validator {names}: escalate"),),
            DEFAULT_EXPIRE_AFTER,
        )
    held = [rule for rule, _ in matched if rule.action is EscalationAction.HOLD]
    action = EscalationAction.HOLD if held else EscalationAction.REVIEW_AFTER
    deciding = held or [rule for rule, _ in matched]
    return EscalationDecision(
        action,
        tuple((rule.rule_id, description) for rule, description in matched),
        min(rule.expire_after for rule in deciding),
    )
