"""Runs the validators of one response, concurrently with generation and with each other.

Per response the response path does three things (nothing when no validator
matches: `Validators.start` returns None):

1. `run = validators.start(facts)` when the response starts. Stream-mode
   validators open their `ValidateStream` call at once, so connection and
   start message cost nothing later. `run.gates_release` says whether a
   matched validator is a release gate (release no text before `finish`).
2. `run.feed(text)` with each piece of released text. It never awaits and
   never blocks: the text is appended to each stream validator's pending
   window and its sender task writes it when the window is full (windows
   coalesce while a validator reads slowly; past `MAX_BACKLOG_CHARS` behind,
   the validator counts as errored). `run.halted` turns true as soon as a
   stream validator FAILs (or errors under fail_closed): release nothing more.
3. `result = await run.finish(final_text)` before `Completed`: every
   validator gives its verdict within its own timeout, all at once; one that
   is down, crashes, hangs or answers garbage is mapped through its
   `on_error`, never raised. `run.cancel()` instead when the response fails.

`ValidationResult` holds one `VerificationCheck` per validator
(`validator:<name>`, outcome, violations, latency) and what the verdicts mean
for the final payload (`resolve`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from google.protobuf import duration_pb2

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire.v1 import validator_pb2_grpc as vgrpc
from tokenwire_server.domain import Message, utf8_length
from tokenwire_server.observability.rate_limited_log import RateLimitedLog
from tokenwire_server.validators.channels import ChannelPool
from tokenwire_server.validators.config import (
    Mode,
    OnError,
    OnFail,
    ValidatorConfig,
    matching,
)

log = logging.getLogger("tokenwire_server.validators")

#: Released text a stream validator may fall behind by before it counts as errored.
MAX_BACKLOG_CHARS = 1_000_000
#: Violations kept per check, and the length of their texts.
MAX_VIOLATIONS = 32
MAX_CODE_CHARS = 64
MAX_MESSAGE_CHARS = 512
#: The largest replacement text a validator may send (characters).
MAX_REPLACEMENT_CHARS = 1_000_000
#: A stream validator's call lives at most this long when the response sets no deadline.
DEFAULT_STREAM_LIFETIME = 600.0


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
_VERDICTS: Mapping[int, tuple[pb.CheckOutcome, Outcome]] = {
    vpb.VALIDATION_OUTCOME_PASS: (pb.CHECK_OUTCOME_PASSED, Outcome.PASS),
    vpb.VALIDATION_OUTCOME_FAIL: (pb.CHECK_OUTCOME_FAILED, Outcome.FAIL),
    vpb.VALIDATION_OUTCOME_ESCALATE: (pb.CHECK_OUTCOME_ESCALATED, Outcome.ESCALATE),
}
_ON_ERROR: Mapping[OnError, Outcome] = {
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


class _Verdicts:
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
        mapped = _VERDICTS.get(answer.outcome)
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
        effective = _ON_ERROR[self.config.on_error]
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
            _report(self.config, f"{code.name}: {error.details()}")
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return self.timed_out(latency)
            what = "is unavailable" if code is grpc.StatusCode.UNAVAILABLE else "failed"
            return self.error(
                _ERROR_CODES.get(code, "VALIDATOR_ERROR"), f"{what} ({code.name})", latency
            )
        _report(self.config, f"{type(error).__name__}: {error}")
        return self.error("VALIDATOR_ERROR", f"failed ({type(error).__name__})", latency)

    def timed_out(self, latency: float) -> ValidatorVerdict:
        return self.error(
            "VALIDATOR_TIMEOUT",
            f"gave no verdict within {self.config.timeout:g} s",
            latency,
            timed_out=True,
        )


_errors_log = RateLimitedLog(log)


def _report(config: ValidatorConfig, detail: str) -> None:
    _errors_log.log(
        logging.WARNING,
        f"validator:{config.name}:{detail[:40]}",
        "validator %s at %s gave no verdict: %s (on_error %s)",
        config.name,
        config.address,
        detail[:300],
        config.on_error.value,
    )


#: Called once per validator verdict: (validator name, outcome word, latency seconds).
CheckHook = Callable[[str, str, float], None]


def _budget(config: ValidatorConfig, deadline: float | None) -> float:
    """The validator's timeout, cut short by the response's deadline."""
    if deadline is None:
        return config.timeout
    return max(0.0, min(config.timeout, deadline - time.monotonic()))


class _UnaryCheck:
    """A validate-mode validator: one `Validate` call on the final payload."""

    def __init__(
        self, config: ValidatorConfig, channel: grpc.aio.Channel, on_check: CheckHook | None
    ) -> None:
        self.config = config
        self._stub = vgrpc.ValidatorServiceStub(channel)
        self._verdicts = _Verdicts(config, on_check)

    async def run(self, facts: ResponseFacts, final_text: str) -> ValidatorVerdict:
        started = time.perf_counter()
        budget = _budget(self.config, facts.deadline)
        try:
            async with asyncio.timeout(budget):
                answer = await self._stub.Validate(
                    facts.request(self.config, final_text), timeout=budget
                )
        except TimeoutError:
            return self._verdicts.timed_out(time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return self._verdicts.failed_call(error, time.perf_counter() - started)
        latency = time.perf_counter() - started
        if not isinstance(answer, vpb.ValidateResponse):  # grpc hands back None for bytes
            _report(self.config, "an answer that is not a ValidateResponse")  # that do not parse
            return self._verdicts.error("VALIDATOR_BAD_ANSWER", "answered garbage", latency)
        return self._verdicts.answer(answer, latency)


class _StreamCheck:
    """A stream-mode validator: one `ValidateStream` call for the response's life."""

    def __init__(
        self,
        run: ValidationRun,
        config: ValidatorConfig,
        channel: grpc.aio.Channel,
        facts: ResponseFacts,
        on_check: CheckHook | None,
    ) -> None:
        self.config = config
        self._run = run
        self._verdicts = _Verdicts(config, on_check)
        self._pending: list[str] = []
        self._pending_chars = 0
        self._wake = asyncio.Event()
        self._end: vpb.TextEnd | None = None
        self._ended_at: float | None = None
        self._sent_bytes = 0
        self._window_starts: list[int] = []
        self.verdict: asyncio.Future[ValidatorVerdict] = asyncio.get_running_loop().create_future()
        lifetime = (
            facts.deadline - time.monotonic()
            if facts.deadline is not None
            else DEFAULT_STREAM_LIFETIME
        )
        self._call = vgrpc.ValidatorServiceStub(channel).ValidateStream(
            timeout=max(0.001, lifetime)
        )
        self._tasks = (
            asyncio.create_task(self._send(facts.request(config)), name=f"{config.name} send"),
            asyncio.create_task(self._read(), name=f"{config.name} read"),
        )

    @property
    def open(self) -> bool:
        return not self.verdict.done()

    def feed(self, text: str) -> None:
        if self.verdict.done() or self._end is not None:
            return
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._pending_chars > MAX_BACKLOG_CHARS:
            self._settle(
                self._verdicts.error(
                    "VALIDATOR_BACKLOG", f"fell more than {MAX_BACKLOG_CHARS} characters behind", 0
                )
            )
        elif self._pending_chars >= self.config.window_chars:
            self._wake.set()

    async def _send(self, start: vpb.ValidateRequest) -> None:
        call = self._call
        try:
            await call.write(vpb.ValidateStreamRequest(start=start))
            while not self.verdict.done():
                await self._wake.wait()
                self._wake.clear()
                if self.verdict.done():
                    return
                if self._pending:
                    text = "".join(self._pending)
                    self._pending.clear()
                    self._pending_chars = 0
                    offset = self._sent_bytes
                    self._window_starts.append(offset)
                    self._sent_bytes += utf8_length(text)
                    await call.write(
                        vpb.ValidateStreamRequest(window=vpb.TextWindow(offset=offset, text=text))
                    )
                if self._end is not None and not self._pending:
                    await call.write(vpb.ValidateStreamRequest(end=self._end))
                    await call.done_writing()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the call broke; the reader reports how
            if not self.verdict.done():
                await asyncio.sleep(0)  # let the reader see the status first
                self._settle(self._verdicts.failed_call(error, self._latency()))

    async def _read(self) -> None:
        try:
            answer = await self._call.read()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._settle(self._verdicts.failed_call(error, self._latency()))
            return
        latency = self._latency()
        if answer is grpc.aio.EOF:
            self._settle(
                self._verdicts.error(
                    "VALIDATOR_BAD_ANSWER", "ended its stream without a verdict", latency
                )
            )
        elif not isinstance(answer, vpb.ValidateStreamResponse):
            _report(self.config, "an answer that is not a ValidateStreamResponse")
            self._settle(self._verdicts.error("VALIDATOR_BAD_ANSWER", "answered garbage", latency))
        else:
            cut = self._window_at(answer.window_offset)
            self._settle(self._verdicts.answer(answer, latency, cut))

    def _window_at(self, offset: int) -> int:
        """The start of the window holding `offset` (the last one sent past the end)."""
        if not self._window_starts:
            return 0
        index = bisect.bisect_right(self._window_starts, offset) - 1
        return self._window_starts[max(0, index)]

    def _latency(self) -> float:
        """Time since the end of the text was handed over (0 for an earlier verdict)."""
        return 0.0 if self._ended_at is None else time.perf_counter() - self._ended_at

    def _settle(self, verdict: ValidatorVerdict) -> None:
        if self.verdict.done():
            return
        self.verdict.set_result(verdict)
        self._wake.set()
        if verdict.effective is Outcome.FAIL:
            self._run._halt(verdict)
        if self._end is None or verdict.errored:
            # An early verdict, or a broken call: nothing more to send.
            self._call.cancel()

    async def finish(self, end: vpb.TextEnd, facts: ResponseFacts) -> ValidatorVerdict:
        if self.verdict.done():
            return self.verdict.result()
        self._end = end
        self._ended_at = time.perf_counter()
        self._wake.set()
        try:
            async with asyncio.timeout(_budget(self.config, facts.deadline)):
                return await asyncio.shield(self.verdict)
        except TimeoutError:
            self._settle(self._verdicts.timed_out(self._latency()))
            self._call.cancel()
            return self.verdict.result()

    async def close(self) -> None:
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class ValidationRun:
    """The validators of one response (see the module docstring for its use)."""

    def __init__(
        self,
        validators: Validators,
        configs: tuple[ValidatorConfig, ...],
        facts: ResponseFacts,
        on_check: CheckHook | None,
    ) -> None:
        self.facts = facts
        self.configs = configs
        #: A matched validator is a release gate: release no text before `finish`.
        self.gates_release = any(c.release_gate for c in configs)
        #: A stream validator failed: release nothing more (generation may stop).
        self.halted = False
        #: With `halted`: the UTF-8 offset of released text the failure starts at.
        self.halt_offset: int | None = None
        self._validators = validators
        self._on_check = on_check
        self._pool = validators.pool
        self._finished = False
        self._digest = hashlib.sha256()
        self._checks: list[_UnaryCheck | _StreamCheck] = []
        for config in configs:
            channel = self._pool.acquire(config)
            if config.mode is Mode.STREAM:
                self._checks.append(_StreamCheck(self, config, channel, facts, on_check))
            else:
                self._checks.append(_UnaryCheck(config, channel, on_check))
        self._streams = [c for c in self._checks if isinstance(c, _StreamCheck)]

    def feed(self, released_text: str) -> None:
        """Released text, in release order. Never awaits; cheap without stream validators."""
        if not self._streams or not released_text:
            return
        self._digest.update(released_text.encode())
        for check in self._streams:
            check.feed(released_text)

    def _halt(self, verdict: ValidatorVerdict) -> None:
        self.halted = True
        offset = verdict.cut_offset if verdict.cut_offset is not None else 0
        self.halt_offset = offset if self.halt_offset is None else min(self.halt_offset, offset)

    async def finish(
        self, final_text: str, tool_calls: Sequence[pb.ToolCall] = ()
    ) -> ValidationResult:
        """Every verdict, each within its timeout; never raises for a validator's failure."""
        if self._finished:
            raise RuntimeError("finish() was already called for this response")
        self._finished = True
        end = vpb.TextEnd(final_sha256=hashlib.sha256(final_text.encode()).hexdigest())
        if self._streams:
            end.diverged = end.final_sha256 != self._digest.hexdigest()
            if end.diverged:
                end.final_text = final_text
        end.tool_calls.extend(tool_calls)
        try:
            verdicts = await asyncio.gather(
                *(
                    check.finish(end, self.facts)
                    if isinstance(check, _StreamCheck)
                    else check.run(self.facts, final_text)
                    for check in self._checks
                )
            )
        finally:
            await self._release()
        return ValidationResult(tuple(verdicts))

    def cancel(self) -> None:
        """The response failed or was cancelled: stop every validator call now."""
        if self._finished:
            return
        self._finished = True
        task = asyncio.get_running_loop().create_task(self._release())
        self._validators.keep(task)

    async def _release(self) -> None:
        for check in self._streams:
            await check.close()
        for config in self.configs:
            self._pool.release(config)
        await self._pool.collect()


class Validators:
    """The configured validators and their channels; one per server."""

    def __init__(
        self, configs: Sequence[ValidatorConfig] = (), on_check: CheckHook | None = None
    ) -> None:
        self.configs: tuple[ValidatorConfig, ...] = tuple(configs)
        self.pool = ChannelPool()
        self._on_check = on_check
        self._tasks: set[asyncio.Task[None]] = set()

    def configure(self, configs: Sequence[ValidatorConfig]) -> None:
        """A reload: new responses use `configs`; running ones keep theirs."""
        self.configs = tuple(configs)
        self.pool.retain(self.configs)

    def matching(
        self, model: str, tenant: str, labels: Mapping[str, str]
    ) -> tuple[ValidatorConfig, ...]:
        return matching(self.configs, model, tenant, labels)

    def start(self, facts: ResponseFacts) -> ValidationRun | None:
        """The run for one response, or None when no validator applies to it.
        Call it inside the event loop, when the response starts."""
        configs = self.matching(facts.model, facts.tenant, facts.labels)
        if not configs:
            return None
        return ValidationRun(self, configs, facts, self._on_check)

    def keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.pool.aclose()
