"""A validator's answer, or its failure to answer, as one verdict.

An answer becomes a check with its (clipped) violations; a validator that is
down, crashes, times out or answers garbage becomes an ERROR or TIMED_OUT
check with one `VALIDATOR_*` violation, and its `on_error` decides what it
means. The detail (status, address) is logged, rate-limited, never shown to
callers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import duration_pb2

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire_server.observability.rate_limited_log import RateLimitedLog
from tokenwire_server.validators.config import Mode, OnFail, ValidatorConfig
from tokenwire_server.validators.results import ON_ERROR, VERDICTS, Outcome, ValidatorVerdict

log = logging.getLogger("tokenwire_server.validators")

#: Violations kept per check, and the length of their texts.
MAX_VIOLATIONS = 32
MAX_CODE_CHARS = 64
MAX_MESSAGE_CHARS = 512
#: The largest replacement text a validator may send (characters).
MAX_REPLACEMENT_CHARS = 1_000_000

#: Called once per validator verdict: (validator name, outcome word, latency seconds).
CheckHook = Callable[[str, str, float], None]


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(max(0, int(seconds * 1e9)))
    return duration


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _violations(raw: Sequence[pb.CheckViolation]) -> list[pb.CheckViolation]:
    return [
        pb.CheckViolation(
            code=_clip(v.code, MAX_CODE_CHARS),
            message=_clip(v.message, MAX_MESSAGE_CHARS),
            json_pointer=_clip(v.json_pointer, MAX_MESSAGE_CHARS),
            start=v.start,
            end=v.end,
        )
        for v in list(raw)[:MAX_VIOLATIONS]
    ]


#: Why a validator gave no verdict: the code of its check's one violation.
_ERROR_CODES = {
    grpc.StatusCode.UNAVAILABLE: "VALIDATOR_UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "VALIDATOR_TIMEOUT",
}


class Verdicts:
    """Builds a validator's verdict: from its answer, or from an error via `on_error`."""

    def __init__(self, config: ValidatorConfig, on_check: CheckHook | None) -> None:
        self.config = config
        self._on_check = on_check

    def _done(self, verdict: ValidatorVerdict) -> ValidatorVerdict:
        if self._on_check is not None:
            seconds = verdict.check.latency.ToNanoseconds() / 1e9
            self._on_check(self.config.name, verdict.word, seconds)
        return verdict

    def answer(
        self,
        answer: vpb.ValidateResponse | vpb.ValidateStreamResponse,
        latency: float,
        cut_offset: int | None = None,
    ) -> ValidatorVerdict:
        mapped = VERDICTS.get(answer.outcome)
        if mapped is None:
            return self.error(
                "VALIDATOR_BAD_ANSWER", f"answered outcome {int(answer.outcome)}", latency
            )
        replacement = answer.replacement_text if answer.HasField("replacement_text") else None
        if replacement is not None and len(replacement) > MAX_REPLACEMENT_CHARS:
            return self.error("VALIDATOR_BAD_ANSWER", "replacement text too long", latency)
        outcome, effective = mapped
        check = pb.VerificationCheck(
            name=self.config.check_name,
            outcome=outcome,
            violations=_violations(answer.violations),
            latency=_duration(latency),
        )
        if effective is not Outcome.FAIL or self.config.on_fail is OnFail.BLOCK:
            cut_offset = None
        elif cut_offset is None and self.config.mode is Mode.VALIDATE:
            starts = [v.start for v in answer.violations if v.end > v.start]
            cut_offset = min(starts) if starts else None
        detail = _clip(answer.reason, 200) or ", ".join(c.code for c in check.violations[:3])
        reason = f"validator {self.config.name}: {effective.value}" + (
            f" ({detail})" if detail else ""
        )
        return self._done(
            ValidatorVerdict(self.config, check, effective, reason, replacement, cut_offset)
        )

    def error(
        self, code: str, what: str, latency: float, timed_out: bool = False
    ) -> ValidatorVerdict:
        effective = ON_ERROR[self.config.on_error]
        check = pb.VerificationCheck(
            name=self.config.check_name,
            outcome=pb.CHECK_OUTCOME_TIMED_OUT if timed_out else pb.CHECK_OUTCOME_ERROR,
            violations=[pb.CheckViolation(code=code, message=f"the validator {what}")],
            latency=_duration(latency),
        )
        reason = (
            f"validator {self.config.name}: {what} ({self.config.on_error.value}: "
            f"{effective.value})"
        )
        return self._done(ValidatorVerdict(self.config, check, effective, reason))

    def failed_call(self, error: BaseException, latency: float) -> ValidatorVerdict:
        """A call that raised: the validator is down, crashed, or its answer did not parse."""
        if isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            report(self.config, f"{code.name}: {error.details()}")
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return self.timed_out(latency)
            if code is grpc.StatusCode.INTERNAL and "serializ" in (error.details() or ""):
                return self.error("VALIDATOR_BAD_ANSWER", "answered garbage", latency)
            what = "is unavailable" if code is grpc.StatusCode.UNAVAILABLE else "failed"
            return self.error(
                _ERROR_CODES.get(code, "VALIDATOR_ERROR"), f"{what} ({code.name})", latency
            )
        report(self.config, f"{type(error).__name__}: {error}")
        return self.error("VALIDATOR_ERROR", f"failed ({type(error).__name__})", latency)

    def timed_out(self, latency: float) -> ValidatorVerdict:
        return self.error(
            "VALIDATOR_TIMEOUT",
            f"gave no verdict within {self.config.timeout:g} s",
            latency,
            timed_out=True,
        )


_errors_log = RateLimitedLog(log)


def report(config: ValidatorConfig, detail: str) -> None:
    _errors_log.log(
        logging.WARNING,
        f"validator:{config.name}:{detail[:40]}",
        "validator %s at %s gave no verdict: %s (on_error %s)",
        config.name,
        config.address,
        detail[:300],
        config.on_error.value,
    )
