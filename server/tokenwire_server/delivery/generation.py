"""The producer: drives a backend through governance into a `LiveResponse`.

It runs as its own task so that generation and delivery are decoupled: the
writer never waits on the model, the model waits on the writer only when the
stream's bounded buffer is full, and cancelling this task stops the backend at
its next await, within one token step.

Deadline and stall checks cost O(1) per token: a token only records the time;
one timer per generation wakes at the next possible expiry and cancels the
task when it really has expired.

Why one module: the generation loop, its watchdog and the one place a
response's ending is decided (finish reason, verdict, the validation path's
conclusion) belong together: every ending passes through `_generate`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from opentelemetry import trace

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit.store import AuditWriteError
from tokenwire_server.backends.base import Backend
from tokenwire_server.delivery.output_checks import OutputChecks, StrictOutput
from tokenwire_server.delivery.response import LiveResponse, Outcome
from tokenwire_server.delivery.tool_calls import ToolCallAssembly
from tokenwire_server.domain import (
    Action,
    DeliveryMode,
    Finish,
    FinishReason,
    GenerationRequest,
    ToolCall,
    ToolCallFragment,
    Verdict,
)
from tokenwire_server.errors import (
    AuditUnavailable,
    BackendStalled,
    DeadlineExceeded,
    InternalError,
    TokenwireError,
)
from tokenwire_server.governance.policy import GovernanceSession
from tokenwire_server.tokens import estimate_prompt_tokens

log = logging.getLogger(__name__)


class Watchdog:
    """Cancels a task when its deadline passes or its token source goes quiet.

    A token costs one integer increment (`progress`). A timer wakes every half
    stall timeout; two wakes in a row without progress mean the backend
    stalled (detected between 1 and 1.5 stall timeouts after its last token).
    """

    def __init__(
        self,
        task: asyncio.Task[None],
        deadline: float | None,
        stall_timeout: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = task
        self._deadline = deadline
        self._stall_timeout = stall_timeout
        self._interval = stall_timeout / 2
        #: Incremented for every token; the only per-token cost.
        self.progress = 0
        self._seen = -1
        self._quiet_checks = 0
        self._suspended = False
        self.fired: TokenwireError | None = None
        self._handle = self._loop.call_at(self._next_check(), self._check)

    def suspend(self) -> None:
        """Stall checks pause while generation waits on a slow reader."""
        self._suspended = True

    def resume(self) -> None:
        self._suspended = False
        self.progress += 1

    def stop(self) -> None:
        self._handle.cancel()

    def _next_check(self) -> float:
        at = self._loop.time() + self._interval
        return at if self._deadline is None else min(at, self._deadline)

    def _check(self) -> None:
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self.fired = DeadlineExceeded("the call's deadline passed during generation")
        elif self.progress != self._seen or self._suspended:
            self._seen = self.progress
            self._quiet_checks = 0
        else:
            self._quiet_checks += 1
            if self._quiet_checks >= 2:
                self.fired = BackendStalled(
                    f"the backend produced no token for {self._stall_timeout:g}s",
                    metadata={"stallTimeoutSeconds": f"{self._stall_timeout:g}"},
                )
        if self.fired is not None:
            self._task.cancel()
            return
        self._handle = self._loop.call_at(self._next_check(), self._check)


async def _wait_for_space(response: LiveResponse, watchdog: Watchdog) -> None:
    """Backpressure: a reader's slowness is not a stalled backend."""
    watchdog.suspend()
    await response.wait_for_space()
    watchdog.resume()


async def _release_batch(
    batch: list[str],
    push: Callable[[str], tuple[str, tuple[Action, ...]]],
    response: LiveResponse,
    watchdog: Watchdog,
) -> None:
    """Tokens that arrived together pass governance as one text: the policy scans
    a read once instead of once per token, which is what makes a governed
    stream keep up with a fast upstream. When the policy lets the text through
    untouched the tokens are released one by one, so `max_tokens_per_chunk`
    holds, and no further than the pending budget allows at a time (as if
    they had come singly); text it held back or rewrote is released as one
    piece, as it is when a single token completes a held span."""
    joined = "".join(batch)
    text, actions = push(joined)
    if text != joined or actions:
        response.release(text, actions, len(batch))
        return
    start, count = 0, len(batch)
    while start < count:
        end, room = start, response.pending.room
        while end < count and room >= 0:
            room -= len(batch[end])
            end += 1
        response.release_tokens(batch[start:end] if start or end < count else batch)
        start = end
        if start < count:
            await _wait_for_space(response, watchdog)
            if response.done:
                return


#: Items a generation handles before it lets other tasks run, when its backend
#: has not waited on its own.
_YIELD_EVERY = 64


async def run_generation(
    backend: Backend,
    request: GenerationRequest,
    session: GovernanceSession,
    response: LiveResponse,
    stall_timeout: float,
    open_arguments_session: Callable[[], GovernanceSession],
) -> None:
    """Generates into `response` and ends it exactly once, whatever happens.

    `open_arguments_session` opens the session that governs one tool call's
    arguments (a JSON-aware one), whether or not the request offered tools:
    a model may call one anyway, and its arguments are governed like text.

    What generation did is told on the call's server span (the current span,
    which the generation task copied when it was created): the backend, the
    time to its first token, how many governance actions it took, an error.
    Not a span of its own: every span is encoded and exported on the event
    loop, and a second span per call cost about a tenth of a unary call's CPU.
    A generation that outlives its call (a resumable stream nobody reads)
    finds the span ended and says nothing more there.
    """
    span = trace.get_current_span()
    await _generate(backend, request, session, response, stall_timeout, open_arguments_session)
    if span.is_recording():
        attributes: dict[str, str | int | float] = {"tokenwire.backend": backend.name}
        if response.first_token_at is not None:
            attributes["tokenwire.time_to_first_token_ms"] = round(
                (response.first_token_at - response.started_at) * 1000, 3
            )
        if response.error is not None:  # the call's status says the rest
            attributes["tokenwire.generation_error"] = response.error.reason
        span.set_attributes(attributes)


async def _generate(
    backend: Backend,
    request: GenerationRequest,
    session: GovernanceSession,
    response: LiveResponse,
    stall_timeout: float,
    open_arguments_session: Callable[[], GovernanceSession],
) -> None:
    task = asyncio.current_task()
    assert task is not None
    watchdog = Watchdog(task, request.deadline, stall_timeout)
    finish: Finish | None = None
    push = session.push
    release = response.release
    validation = response.validation
    tool_calls: ToolCallAssembly | None = None
    strict = StrictOutput(request) if StrictOutput.wanted(request) else None
    # A stream's reader sends the first text as soon as it is released (below);
    # a unary or buffered response has nobody to send it before the end.
    first_release = (
        response.delivery is not None and response.mode_used is not DeliveryMode.BUFFERED
    )
    try:
        tokens = backend.generate(request)
        try:
            async for item in tokens:
                if isinstance(item, Finish):
                    finish = item
                    continue
                watchdog.progress += 1
                if isinstance(item, str):
                    if strict is not None and strict.text(item):
                        break  # strict: it can no longer become valid; not released
                    text, actions = push(item)
                    release(text, actions)
                elif isinstance(item, list):
                    if strict is not None and strict.text("".join(item)):
                        break
                    await _release_batch(item, push, response, watchdog)
                elif isinstance(item, ToolCallFragment):
                    if tool_calls is None:
                        tool_calls = ToolCallAssembly(open_arguments_session)
                    if strict is not None and strict.fragment(
                        *tool_calls.locate(item), item.arguments
                    ):
                        break
                    governed = tool_calls.push(item)
                    if governed is None:
                        response.count_tokens(1)
                    else:
                        response.release_tool(
                            governed.index,
                            governed.arguments,
                            governed.actions,
                            1,
                            governed.id,
                            governed.name,
                        )
                    if tool_calls.halted:
                        break
                else:
                    raise InternalError(
                        f"backend {backend.name} yielded {type(item).__name__}, not text",
                        reason="BACKEND_ERROR",
                    )
                if session.halted or (validation is not None and validation.halted):
                    break  # blocked: stop the backend; the decision comes from finish()
                if response.pending.over_budget:
                    await _wait_for_space(response, watchdog)
                elif first_release and response.has_pending:
                    # The first text is out of governance: let its reader send it
                    # now, not once the rest of a burst has been handled too.
                    first_release = False
                    await asyncio.sleep(0)
                elif not watchdog.progress % _YIELD_EVERY:
                    # A backend that never waits (a burst already in memory) would
                    # otherwise hold the loop until the pending budget fills: every
                    # other stream, and this one's own writer, would stall meanwhile.
                    await asyncio.sleep(0)
        finally:
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()
    except asyncio.CancelledError:
        if validation is not None:
            validation.cancel()
        if watchdog.fired is None:
            response.cancel()
            raise
        task.uncancel()
        response.fail(watchdog.fired)
    except TokenwireError as error:
        if validation is not None:
            validation.cancel()
        response.fail(error)
    except Exception:
        if validation is not None:
            validation.cancel()
        log.exception("backend %s crashed", backend.name)
        response.fail(InternalError("the backend failed unexpectedly", reason="BACKEND_ERROR"))
    else:
        tail, tail_actions, decision = session.finish()
        # The policy's decision: the verdict is on the span already (from
        # `Completed`); how many actions it took is worth an attribute when any.
        if decision.actions:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute("tokenwire.governance_actions", len(decision.actions))
        if tail or tail_actions:
            release(tail, tail_actions, 0)
        final_calls: tuple[ToolCall, ...] = ()
        calls_review = False
        refusal: str | None = None
        verdict = decision.verdict if decision.verdict else Verdict.ALLOWED
        if tool_calls is not None:
            tails, calls_decision = tool_calls.finish()
            for governed in tails:
                response.release_tool(governed.index, governed.arguments, governed.actions, 0)
            verdict = max(verdict, calls_decision.verdict)
            calls_review = calls_decision.review_required
            if calls_decision.blocked:
                refusal = calls_decision.refusal_text or ""
            else:
                final_calls = tuple(
                    dataclasses.replace(call, arguments=calls_decision.rewritten[position])
                    if position in calls_decision.rewritten
                    else call
                    for position, call in enumerate(response.released_tool_calls)
                )
        response.settle()
        finish = finish or Finish()
        blocked = decision.blocked or refusal is not None
        if blocked:
            final_calls = ()  # a blocked answer hands the caller nothing to run
        final_text = decision.text if decision.text is not None else response.released_text
        if refusal is not None and not decision.blocked:
            final_text = refusal
        checks: tuple[pb.VerificationCheck, ...] = ()
        checks_passed = True
        review: tuple[str, str] | None = None
        held = False
        if validation is not None:
            # The validators answer within their own timeouts: no stall while they
            # decide, but the call's deadline still holds.
            watchdog.suspend()
            try:
                concluded = await validation.conclude(
                    response_id=response.response_id,
                    final_text=final_text,
                    released_text=response.released_text,
                    verdict=verdict,
                    actions=decision.actions,
                    model=response.model.name,
                    model_version=response.model.version,
                    policy_id=response.policy_id,
                    policy_version=response.policy_version,
                    tool_calls=final_calls,
                )
            except asyncio.CancelledError:
                if watchdog.fired is None:  # the response was cancelled
                    response.cancel()
                    raise
                task.uncancel()
                response.fail(watchdog.fired)
                return
            except TokenwireError as error:  # the review could not be opened
                response.fail(error)
                return
            except AuditWriteError:
                response.fail(AuditUnavailable())
                return
            final_text, verdict = concluded.final_text, concluded.verdict
            blocked = blocked or concluded.blocked
            checks, held = concluded.checks, concluded.held
            checks_passed = concluded.checks_passed
            if concluded.review is not None:
                review = (concluded.review.review_id, concluded.review.state.name)
            if concluded.blocked or held:
                final_calls = ()
        stopped = strict.failed if strict is not None else None
        if not blocked and not held and (final_calls or OutputChecks.wanted(request)):
            output_checks = OutputChecks(request).final(final_text, final_calls, stopped)
            checks = output_checks + checks
            checks_passed = checks_passed and not any(
                check.outcome == pb.CHECK_OUTCOME_FAILED for check in output_checks
            )
        reason = finish.reason
        if blocked:
            reason = FinishReason.POLICY_BLOCKED
        elif stopped is not None:
            reason = FinishReason.INVALID_OUTPUT
        elif final_calls and reason in (FinishReason.STOP, FinishReason.STOP_SEQUENCE):
            reason = FinishReason.TOOL_CALLS
        elif not final_calls and reason is FinishReason.TOOL_CALLS:
            reason = FinishReason.STOP
        response.finish(
            Outcome(
                final_text=final_text,
                finish_reason=reason,
                prompt_tokens=(
                    finish.prompt_tokens
                    if finish.prompt_tokens is not None
                    else estimate_prompt_tokens(request.messages)
                ),
                completion_tokens=(
                    finish.completion_tokens
                    if finish.completion_tokens is not None
                    else response.tokens_generated
                ),
                verdict=verdict,
                review_required=decision.review_required or calls_review or review is not None,
                actions=decision.actions,
                path=finish.path,
                attempts=finish.attempts,
                backend=finish.backend or response.model.backend,
                checks=checks,
                checks_passed=checks_passed,
                review=review,
                held=held,
                tool_calls=final_calls,
            )
        )
    finally:
        watchdog.stop()
