"""Escalation rules: the policy file's `escalation:` section and decide_escalation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenwire_server.governance.escalation import (
    DEFAULT_EXPIRE_AFTER,
    NO_ESCALATION,
    VALIDATOR_ESCALATION,
    EscalationAction,
    EscalationFacts,
    EscalationRule,
    EscalationRules,
    decide_escalation,
)
from tokenwire_server.governance.policy import PassThroughPolicy
from tokenwire_server.governance.policy_file import PolicyError, load_policy

HOLD, AFTER = EscalationAction.HOLD, EscalationAction.REVIEW_AFTER

POLICY = """
id: acme
version: "3"
redact:
  - detector: payment_card
flag:
  - id: medical
    terms: [diagnosis]
escalation:
  - id: advice-hold
    when:
      validator_outcome: [escalate]
      validators: [compliance]
      labels: {risk: high}
    action: hold
    expire_after: 600
  - id: cards
    when:
      entity_types: [PAYMENT_CARD]
    action: review_after
  - id: medical
    when:
      flags: [medical]
      tenants: [acme]
    action: review_after
    expire_after: 3600
  - id: broken-checks
    when:
      check_errored: true
      models: [tokenwire-sim]
    action: hold
  - id: divergence
    when:
      diverged: true
    action: review_after
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def rules_of(tmp_path: Path, text: str = POLICY) -> EscalationRules:
    return load_policy(write(tmp_path, text)).escalation


def test_the_section_parses_in_order_with_defaults(tmp_path: Path) -> None:
    rules = rules_of(tmp_path).rules
    assert [r.rule_id for r in rules] == [
        "advice-hold",
        "cards",
        "medical",
        "broken-checks",
        "divergence",
    ]
    advice = rules[0]
    assert advice.action is HOLD and advice.expire_after == 600
    assert advice.validator_outcomes == {"escalate"} and advice.validators == {"compliance"}
    assert advice.labels == (("risk", "high"),)
    assert rules[1].expire_after == DEFAULT_EXPIRE_AFTER and rules[1].action is AFTER
    assert rules[3].check_errored is True and rules[3].models == {"tokenwire-sim"}
    assert rules[4].diverged is True and rules[4].check_errored is None


def test_toml_policies_take_the_same_section(tmp_path: Path) -> None:
    toml = """
id = "acme"
version = 1
[[escalation]]
id = "risky"
action = "hold"
[escalation.when]
labels = { risk = "high" }
"""
    rules = load_policy(write(tmp_path, toml, "policy.toml")).escalation.rules
    assert rules == (EscalationRule("risky", HOLD, labels=(("risk", "high"),)),)


def test_policies_without_the_section_escalate_nothing(tmp_path: Path) -> None:
    assert PassThroughPolicy().escalation is NO_ESCALATION
    assert load_policy("builtin:default").escalation == NO_ESCALATION
    assert rules_of(tmp_path, "id: p\nversion: 1\n") == NO_ESCALATION


def _policy_with(rule: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "id": "p",
            "version": 1,
            "flag": [{"id": "medical", "terms": ["x"]}],
            "escalation": [{"id": "fine", "when": {"diverged": True}, "action": "hold"}, rule],
        }
    )


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"id": "r", "when": {"diverged": True}}, r"escalation\[1\] \(r\): action must be hold"),
        ({"id": "r", "when": {"diverged": True}, "action": "ask"}, "action must be hold or"),
        ({"when": {"diverged": True}, "action": "hold"}, r"escalation\[1\]: id must be"),
        ({"id": "r", "action": "hold"}, r"\(r\): when must be a table with at least one"),
        ({"id": "r", "when": {}, "action": "hold"}, "at least one condition"),
        ({"id": "r", "when": {"colour": ["red"]}, "action": "hold"}, "unknown condition 'colour'"),
        (
            {"id": "r", "when": {"validator_outcome": ["maybe"]}, "action": "hold"},
            "when.validator_outcome: unknown outcome 'maybe'",
        ),
        (
            {"id": "r", "when": {"validators": ["compliance"]}, "action": "hold"},
            "when.validators needs when.validator_outcome",
        ),
        (
            {"id": "r", "when": {"flags": ["legal"]}, "action": "hold"},
            "when.flags: the policy has no flag rule 'legal'",
        ),
        ({"id": "r", "when": {"labels": ["risk"]}, "action": "hold"}, "when.labels must map"),
        ({"id": "r", "when": {"models": "m"}, "action": "hold"}, "when.models must be a list"),
        ({"id": "r", "when": {"diverged": "yes"}, "action": "hold"}, "when.diverged must be"),
        (
            {"id": "r", "when": {"diverged": True}, "action": "hold", "expire_after": 0},
            "expire_after must be seconds > 0",
        ),
        (
            {"id": "r", "when": {"diverged": True}, "action": "hold", "expire_after": 10**9},
            "expire_after must be seconds > 0 and <= 2592000",
        ),
        ({"id": "r", "when": {"diverged": True}, "action": "hold", "why": 1}, "unknown key 'why'"),
        (
            {"id": "fine", "when": {"diverged": True}, "action": "hold"},
            "escalation rule ids must be unique; repeated: fine",
        ),
    ],
)
def test_bad_rules_are_refused_with_file_and_position(
    tmp_path: Path, rule: dict[str, Any], message: str
) -> None:
    path = write(tmp_path, _policy_with(rule))
    with pytest.raises(PolicyError, match=message) as raised:
        load_policy(path)
    assert str(raised.value).startswith(path)


def test_the_section_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="escalation must be a list of tables"):
        load_policy(write(tmp_path, "id: p\nversion: 1\nescalation: {id: x}\n"))


# ------------------------------------------------------------------ decisions


def facts(**fields: Any) -> EscalationFacts:
    fields.setdefault("model", "tokenwire-sim")
    fields.setdefault("tenant", "acme")
    return EscalationFacts(**fields)


def test_nothing_matches_nothing_escalates(tmp_path: Path) -> None:
    rules = rules_of(tmp_path)
    assert rules.decide(facts()) is None
    assert decide_escalation((), facts()) is None


def test_a_validator_escalation_with_the_label_holds(tmp_path: Path) -> None:
    rules = rules_of(tmp_path)
    decision = rules.decide(
        facts(
            labels={"risk": "high"},
            validator_outcomes={"compliance": "escalate", "other": "pass"},
            escalated_by=frozenset({"compliance"}),
        )
    )
    assert decision is not None and decision.held and decision.action is HOLD
    assert decision.reasons == (("advice-hold", "validator compliance: escalate; label risk=high"),)
    assert decision.expire_after == 600


def test_a_validator_outside_the_rule_or_without_the_label_goes_review_after(
    tmp_path: Path,
) -> None:
    rules = rules_of(tmp_path)
    for escalated in (
        facts(validator_outcomes={"other": "escalate"}, escalated_by=frozenset({"other"})),
        facts(
            validator_outcomes={"compliance": "escalate"},
            escalated_by=frozenset({"compliance"}),
            labels={"risk": "low"},
        ),
    ):
        decision = rules.decide(escalated)
        assert decision is not None and decision.action is AFTER
        assert decision.rule_ids == (VALIDATOR_ESCALATION,)
        assert decision.expire_after == DEFAULT_EXPIRE_AFTER


def test_entities_flags_tenant_errors_and_divergence(tmp_path: Path) -> None:
    rules = rules_of(tmp_path)
    cards = rules.decide(facts(entity_types=frozenset({"PAYMENT_CARD", "EMAIL"})))
    assert cards is not None and cards.action is AFTER
    assert cards.reasons == (("cards", "detected PAYMENT_CARD"),)
    assert rules.decide(facts(entity_types=frozenset({"EMAIL"}))) is None
    medical = rules.decide(facts(flag_rule_ids=frozenset({"medical"})))
    assert medical is not None and medical.rule_ids == ("medical",)
    assert medical.expire_after == 3600
    assert rules.decide(facts(flag_rule_ids=frozenset({"medical"}), tenant="globex")) is None
    errored = rules.decide(facts(check_errored=True))
    assert errored is not None and errored.held and errored.rule_ids == ("broken-checks",)
    assert rules.decide(facts(check_errored=True, model="other")) is None
    diverged = rules.decide(facts(diverged=True))
    assert diverged is not None and diverged.rule_ids == ("divergence",)


def test_hold_wins_and_every_matching_rule_is_a_reason(tmp_path: Path) -> None:
    rules = rules_of(tmp_path)
    decision = rules.decide(
        facts(
            entity_types=frozenset({"PAYMENT_CARD"}),
            check_errored=True,
            diverged=True,
        )
    )
    assert decision is not None and decision.held
    assert decision.rule_ids == ("cards", "broken-checks", "divergence")
    assert decision.expire_after == DEFAULT_EXPIRE_AFTER  # the hold rule's, not the shortest


def test_false_conditions_require_the_fact_to_be_false() -> None:
    rule = EscalationRule("calm", AFTER, diverged=False, check_errored=False)
    decision = decide_escalation((rule,), facts())
    assert decision is not None and decision.reasons == (
        ("calm", "no check errored; not diverged"),
    )
    assert decide_escalation((rule,), facts(diverged=True)) is None


def test_validator_outcome_words_cover_errors_and_timeouts() -> None:
    rule = EscalationRule("down", HOLD, validator_outcomes=frozenset({"error", "timed_out"}))
    decision = decide_escalation((rule,), facts(validator_outcomes={"a": "timed_out"}))
    assert decision is not None and decision.reasons == (("down", "validator a: timed_out"),)
    assert decide_escalation((rule,), facts(validator_outcomes={"a": "fail"})) is None


def test_may_hold_looks_only_at_what_is_known_at_the_start(tmp_path: Path) -> None:
    rules = rules_of(tmp_path)
    assert rules.may_hold("tokenwire-sim", "acme", {"risk": "high"})  # advice-hold, broken-checks
    assert rules.may_hold("tokenwire-sim", "acme", {})  # broken-checks: any tenant, this model
    assert not rules.may_hold("other-model", "acme", {"risk": "low"})
    assert not NO_ESCALATION.may_hold("m", "t", {})
    review_only = EscalationRules((EscalationRule("r", AFTER, diverged=True),))
    assert not review_only.may_hold("m", "t", {})


def test_decisions_are_pure() -> None:
    rules = (
        EscalationRule("a", AFTER, entity_types=frozenset({"EMAIL"})),
        EscalationRule("b", HOLD, labels=(("risk", "high"),), expire_after=60),
    )
    known = facts(entity_types=frozenset({"EMAIL"}), labels={"risk": "high"})
    first = decide_escalation(rules, known)
    assert first == decide_escalation(rules, known)
    assert first is not None and first.held and first.expire_after == 60
