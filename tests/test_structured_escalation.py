"""Escalation on tools: a rule's `tools:` condition matches a response that
called one of them, `may_hold` holds a response whose request offers one,
and the validation path hands the calls to validators (ValidateRequest;
ValidateStream's TextEnd already carried them) and their names to the rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.test_escalation import write
from tests.test_validators import (  # noqa: F401  (fixtures)
    StartValidator,
    config,
    facts,
    start_validator,
    validators,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.delivery.validation_path import ValidationPath
from tokenwire_server.domain import ToolCall, Verdict
from tokenwire_server.governance.escalation import EscalationAction, EscalationFacts
from tokenwire_server.governance.policy_file import PolicyError, load_policy
from tokenwire_server.review.model import OpenReview, ReviewState
from tokenwire_server.validators.runner import Validators

POLICY = """
id: bank
version: "1"
escalation:
  - id: money-moves
    when:
      tools: [transfer_funds, close_account]
    action: hold
  - id: vip-lookups
    when:
      tools: [lookup_customer]
      labels: {tier: vip}
    action: review_after
"""


def test_the_tools_condition_parses_and_matches_called_tools(tmp_path: Path) -> None:
    rules = load_policy(write(tmp_path, POLICY)).escalation
    money = rules.rules[0]
    assert money.tools == {"transfer_funds", "close_account"}
    decision = rules.decide(EscalationFacts(tool_names=frozenset({"transfer_funds"})))
    assert decision is not None and decision.held
    assert decision.reasons == (("money-moves", "called transfer_funds"),)
    assert rules.decide(EscalationFacts(tool_names=frozenset({"get_weather"}))) is None
    assert rules.decide(EscalationFacts()) is None
    vip = rules.decide(
        EscalationFacts(labels={"tier": "vip"}, tool_names=frozenset({"lookup_customer"}))
    )
    assert vip is not None and vip.action is EscalationAction.REVIEW_AFTER


def test_may_hold_when_the_request_offers_a_named_tool(tmp_path: Path) -> None:
    rules = load_policy(write(tmp_path, POLICY)).escalation
    assert rules.may_hold("m", "t", {}, tools=["get_weather", "transfer_funds"])
    assert not rules.may_hold("m", "t", {}, tools=["get_weather"])
    assert not rules.may_hold("m", "t", {})
    assert not rules.may_hold("m", "t", {"tier": "vip"}, tools=["lookup_customer"])  # not hold


def test_a_bad_tools_condition_is_refused(tmp_path: Path) -> None:
    bad = POLICY.replace("tools: [transfer_funds, close_account]", "tools: transfer_funds")
    with pytest.raises(PolicyError, match=r"escalation\[0\] \(money-moves\): when.tools"):
        load_policy(write(tmp_path, bad))


CALLS = (ToolCall("call_1", "transfer_funds", '{"amount": 10}'),)


async def test_the_validation_path_sends_the_calls_and_escalates_on_them(
    tmp_path: Path,
    start_validator: StartValidator,  # noqa: F811
    validators: Callable[..., Validators],  # noqa: F811
) -> None:
    rules = load_policy(write(tmp_path, POLICY)).escalation
    desk = FakeDesk()
    validator = await start_validator()
    pool = validators(config("audit", validator.address))
    path = ValidationPath(
        run=pool.start(facts()),
        rules=rules,
        desk=desk,  # type: ignore[arg-type]
        tenant="acme",
        labels={},
        request_id="",
        may_hold=rules.may_hold("tokenwire-sim", "acme", {}, tools=["transfer_funds"]),
    )
    assert path.withholds
    concluded = await path.conclude(
        response_id="rsp-1",
        final_text="",
        released_text="",
        verdict=Verdict.ALLOWED,
        actions=(),
        model="tokenwire-sim",
        model_version="1",
        policy_id="bank",
        policy_version="1",
        tool_calls=CALLS,
    )
    assert concluded.checks[0].outcome == pb.CHECK_OUTCOME_PASSED
    sent = list(validator.seen.requests[-1].tool_calls)
    assert [(c.id, c.name, c.arguments) for c in sent] == [
        ("call_1", "transfer_funds", '{"amount": 10}')
    ]
    # The call's name reached the rules: held for review.
    assert desk.opened and desk.opened[0].decision.rule_ids == ("money-moves",)
    assert concluded.held and concluded.review is not None and concluded.final_text == ""


class FakeDesk:
    """Records the reviews the path opens."""

    def __init__(self) -> None:
        self.opened: list[OpenReview] = []

    async def open(self, review: OpenReview) -> Any:
        self.opened.append(review)
        return SimpleNamespace(review_id="rev-1", state=ReviewState.PENDING)
