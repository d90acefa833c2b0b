"""What happens between a response's governed text and its `Completed`, when
validators or escalation rules apply: the parallel validation path.

Validators (validators/runner.py) run while the response generates: stream
validators read the released text in windows, every validator sees the final
payload when generation ends, all concurrently and each within its own
timeout. Their verdicts act here, once: a FAIL blocks, replaces or cuts the
final payload (the verification gate then states the divergence from what was
streamed), a replacement becomes the final payload, and the escalation rules
of the policy (governance/escalation.py) decide whether a person must look:
`hold` keeps the whole text back until a reviewer decides, `review_after`
releases it and queues the review (review/desk.py).

A response that may be held, or whose validator gates release, is delivered
BUFFERED: nothing of its text leaves before this path has concluded. The
token path of every other response never waits for a validator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import Action, Operator, ToolCall, Verdict
from tokenwire_server.governance.escalation import (
    EscalationDecision,
    EscalationFacts,
    EscalationRules,
)
from tokenwire_server.review.desk import ReviewDesk
from tokenwire_server.review.model import OpenReview, ReviewState
from tokenwire_server.validators.runner import ValidationResult, ValidationRun

#: The final payload of a response a validator blocked.
VALIDATOR_REFUSAL = "This response was withheld by a validator."


@dataclass(frozen=True, slots=True)
class ReviewRef:
    review_id: str
    state: ReviewState


@dataclass(frozen=True, slots=True)
class Concluded:
    """The final payload and what the validation path decided about it."""

    final_text: str
    verdict: Verdict
    blocked: bool
    checks: tuple[pb.VerificationCheck, ...]
    #: No validator failed (an error under `fail_closed` counts as a failure).
    checks_passed: bool
    review: ReviewRef | None
    #: Held for review: nothing of the text is released, `final_text` is empty.
    held: bool


class ValidationPath:
    """One response's validators and escalation rules, from its start to its end."""

    def __init__(
        self,
        *,
        run: ValidationRun | None,
        rules: EscalationRules | None,
        desk: ReviewDesk | None,
        tenant: str,
        labels: Mapping[str, str],
        request_id: str,
        may_hold: bool,
    ) -> None:
        self.run = run
        self._rules = rules
        self._desk = desk
        self._tenant = tenant
        self._labels = dict(labels)
        self._request_id = request_id
        #: Nothing may leave before the path concludes (a hold rule or a release gate).
        self.withholds = may_hold or (run is not None and run.gates_release)

    def feed(self, released: str) -> None:
        if self.run is not None:
            self.run.feed(released)

    @property
    def halted(self) -> bool:
        """A stream validator failed: generation should stop."""
        return self.run is not None and self.run.halted

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()

    async def conclude(
        self,
        *,
        response_id: str,
        final_text: str,
        released_text: str,
        verdict: Verdict,
        actions: tuple[Action, ...],
        model: str,
        model_version: str,
        policy_id: str,
        policy_version: str,
        trace_id: str = "",
        tool_calls: Sequence[ToolCall] = (),
    ) -> Concluded:
        """`tool_calls`: the response's final, governed calls; validators get
        them in ValidateRequest.tool_calls and escalation rules their names."""
        calls = [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in tool_calls]
        result = (
            await self.run.finish(final_text, calls) if self.run is not None else ValidationResult()
        )
        payload = result.resolve(final_text, VALIDATOR_REFUSAL)
        blocked = payload.blocked
        if blocked:
            verdict = Verdict.BLOCKED
        checks = result.checks
        names = frozenset(call.name for call in tool_calls)
        decision = self._escalation(result, payload.text, released_text, actions, model, names)
        review: ReviewRef | None = None
        held = False
        if decision is not None and self._desk is not None:
            opened = await self._desk.open(
                OpenReview(
                    response_id=response_id,
                    tenant=self._tenant,
                    decision=decision,
                    governed_text=payload.text,
                    verdict=verdict,
                    checks=checks,
                    model=model,
                    model_version=model_version,
                    policy_id=policy_id,
                    policy_version=policy_version,
                    labels=self._labels,
                    request_id=self._request_id,
                    trace_id=trace_id,
                )
            )
            review = ReviewRef(opened.review_id, opened.state)
            held = decision.held
        return Concluded(
            final_text="" if held else payload.text,
            verdict=verdict,
            blocked=blocked,
            checks=checks,
            checks_passed=result.passed,
            review=review,
            held=held,
        )

    def _escalation(
        self,
        result: ValidationResult,
        final_text: str,
        released_text: str,
        actions: tuple[Action, ...],
        model: str,
        tool_names: frozenset[str],
    ) -> EscalationDecision | None:
        facts = EscalationFacts(
            model=model,
            tenant=self._tenant,
            labels=self._labels,
            validator_outcomes=result.outcomes,
            escalated_by=frozenset(result.escalated_by),
            entity_types=frozenset(a.entity_type for a in actions if a.entity_type),
            flag_rule_ids=frozenset(a.rule_id for a in actions if a.operator is Operator.FLAG),
            check_errored=result.errored,
            diverged=final_text != released_text and not self.withholds,
            tool_names=tool_names,
        )
        rules = self._rules if self._rules is not None else EscalationRules(())
        return rules.decide(facts)
