"""What validators concluded: one verdict each, and what they mean together.

`ValidationResult` holds one `VerificationCheck` per validator
(`validator:<name>`: outcome, violations, latency), the combined outcome, the
facts escalation rules read (`outcomes`, `escalated_by`, `errored`), and
`resolve`, the final payload the verdicts call for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire_server.domain import Message
from tokenwire_server.validators.config import OnError, ValidatorConfig


class Outcome(StrEnum):
    """What a validator's result means for the response, after its error rule."""

    PASS = "pass"
    FAIL = "fail"
    ESCALATE = "escalate"


#: `CheckOutcome` -> the word escalation rules use.
CHECK_WORDS: Mapping[int, str] = {
    pb.CHECK_OUTCOME_PASSED: "pass",
    pb.CHECK_OUTCOME_FAILED: "fail",
    pb.CHECK_OUTCOME_ESCALATED: "escalate",
    pb.CHECK_OUTCOME_ERROR: "error",
    pb.CHECK_OUTCOME_TIMED_OUT: "timed_out",
}
VERDICTS: Mapping[int, tuple[pb.CheckOutcome, Outcome]] = {
    vpb.VALIDATION_OUTCOME_PASS: (pb.CHECK_OUTCOME_PASSED, Outcome.PASS),
    vpb.VALIDATION_OUTCOME_FAIL: (pb.CHECK_OUTCOME_FAILED, Outcome.FAIL),
    vpb.VALIDATION_OUTCOME_ESCALATE: (pb.CHECK_OUTCOME_ESCALATED, Outcome.ESCALATE),
}
ON_ERROR: Mapping[OnError, Outcome] = {
    OnError.FAIL_CLOSED: Outcome.FAIL,
    OnError.PASS: Outcome.PASS,
    OnError.ESCALATE: Outcome.ESCALATE,
}


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """What a validator is told about the response (and what selects validators)."""

    response_id: str
    model: str
    tenant: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    model_version: str = ""
    policy_id: str = ""
    policy_version: str = ""
    #: The request's conversation; sent only to validators with `send_messages`.
    messages: Sequence[Message] = ()
    #: The response's deadline (`time.monotonic()`), bounding every validator call.
    deadline: float | None = None

    def request(self, config: ValidatorConfig, final_text: str = "") -> vpb.ValidateRequest:
        request = vpb.ValidateRequest(
            response_id=self.response_id,
            model=self.model,
            model_version=self.model_version,
            tenant=self.tenant,
            labels=dict(self.labels),
            policy_id=self.policy_id,
            policy_version=self.policy_version,
            final_text=final_text,
        )
        if config.send_messages:
            for message in self.messages:
                request.messages.add(role=int(message.role), content=message.content)
        return request


@dataclass(frozen=True, slots=True)
class ValidatorVerdict:
    """One validator's result: its check, and what it means after `on_error`."""

    config: ValidatorConfig
    check: pb.VerificationCheck
    effective: Outcome
    reason: str
    replacement_text: str | None = None
    #: FAIL with on_fail = retract: UTF-8 offset in the released/final text to cut at.
    cut_offset: int | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def errored(self) -> bool:
        return self.check.outcome in (pb.CHECK_OUTCOME_ERROR, pb.CHECK_OUTCOME_TIMED_OUT)

    @property
    def word(self) -> str:
        """pass | fail | escalate | error | timed_out (the check's own outcome)."""
        return CHECK_WORDS[self.check.outcome]

    @property
    def blocks(self) -> bool:
        """A FAIL that blocks (not retracts) the response."""
        return self.effective is Outcome.FAIL and self.cut_offset is None


@dataclass(frozen=True, slots=True)
class FinalPayload:
    """The final payload after the validators (see `ValidationResult.resolve`)."""

    text: str
    #: The response is blocked: `text` is the refusal text.
    blocked: bool = False
    #: A validator's replacement text is the final payload (`replaced_by` names it).
    replaced_by: str = ""
    #: The text was cut at this UTF-8 offset (a retraction from the failing window).
    cut_offset: int | None = None

    @property
    def changed(self) -> bool:
        return self.blocked or bool(self.replaced_by) or self.cut_offset is not None


@dataclass(frozen=True, slots=True)
class ValidationResult:
    verdicts: tuple[ValidatorVerdict, ...] = ()

    @property
    def checks(self) -> tuple[pb.VerificationCheck, ...]:
        """One `validator:<name>` check per validator, in configuration order."""
        return tuple(v.check for v in self.verdicts)

    @property
    def outcome(self) -> Outcome:
        """FAIL over ESCALATE over PASS."""
        outcomes = {v.effective for v in self.verdicts}
        for outcome in (Outcome.FAIL, Outcome.ESCALATE):
            if outcome in outcomes:
                return outcome
        return Outcome.PASS

    @property
    def passed(self) -> bool:
        """No validator failed (an error under fail_closed is a failure)."""
        return self.outcome is not Outcome.FAIL

    @property
    def errored(self) -> bool:
        """A validator gave no verdict (down, crashed, timed out, garbage)."""
        return any(v.errored for v in self.verdicts)

    @property
    def escalated_by(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.verdicts if v.effective is Outcome.ESCALATE)

    @property
    def outcomes(self) -> dict[str, str]:
        """Validator name -> pass | fail | escalate | error | timed_out, for escalation rules."""
        return {v.name: v.word for v in self.verdicts}

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(v.reason for v in self.verdicts if v.effective is not Outcome.PASS)

    def resolve(self, final_text: str, refusal_text: str) -> FinalPayload:
        """The final payload the verdicts call for, from the governed `final_text`.

        - A FAIL wins: the first failing validator (configuration order) with a
          replacement text supplies the payload; otherwise any blocking FAIL
          gives the refusal text; otherwise (every FAIL retracts) the text is
          cut before the earliest failing window.
        - No FAIL: the first validator's replacement text, if any.
        - Otherwise the text is unchanged.
        The response path then states any divergence from what was streamed
        (the verification gate compares the chunks sent with this payload).
        """
        failing = [v for v in self.verdicts if v.effective is Outcome.FAIL]
        if failing:
            for verdict in failing:
                if verdict.replacement_text is not None:
                    return FinalPayload(verdict.replacement_text, replaced_by=verdict.name)
            if any(v.blocks for v in failing):
                return FinalPayload(refusal_text, blocked=True)
            cut = min(v.cut_offset for v in failing if v.cut_offset is not None)
            encoded = final_text.encode()
            return FinalPayload(encoded[:cut].decode(errors="ignore"), cut_offset=cut)
        for verdict in self.verdicts:
            if verdict.replacement_text is not None:
                return FinalPayload(verdict.replacement_text, replaced_by=verdict.name)
        return FinalPayload(final_text)

    def summary(self) -> list[dict[str, object]]:
        """For the audit row and the span: names, outcomes, latency, violation codes; no text."""
        return [
            {
                "check": v.check.name,
                "outcome": v.word,
                "effective": v.effective.value,
                "latency_ms": round(v.check.latency.ToNanoseconds() / 1e6, 3),
                "violations": [c.code for c in v.check.violations],
                "replaced": v.replacement_text is not None,
            }
            for v in self.verdicts
        ]


NO_VALIDATORS = ValidationResult()
