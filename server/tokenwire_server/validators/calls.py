"""One validator's call for one response: `Validate` (unary) or `ValidateStream`.

A stream call is opened when the response starts. `feed` only appends to the
pending window (it never awaits); a sender task writes whole windows as the
call can take them, a reader task waits for the one verdict. A FAIL (or an
error under fail_closed) calls `on_fail` at once, so the response stops
releasing text before it ends.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Sequence

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire.v1 import validator_pb2_grpc as vgrpc
from tokenwire_server.domain import utf8_length
from tokenwire_server.validators.config import ValidatorConfig
from tokenwire_server.validators.results import Outcome, ResponseFacts, ValidatorVerdict
from tokenwire_server.validators.verdicts import CheckHook, Verdicts, report

#: Released text a stream validator may fall behind by before it counts as errored.
MAX_BACKLOG_CHARS = 1_000_000
#: A stream validator's call lives at most this long when the response sets no deadline.
DEFAULT_STREAM_LIFETIME = 600.0


def _budget(config: ValidatorConfig, deadline: float | None) -> float:
    """The validator's timeout, cut short by the response's deadline."""
    if deadline is None:
        return config.timeout
    return max(0.0, min(config.timeout, deadline - time.monotonic()))


class UnaryCheck:
    """A validate-mode validator: one `Validate` call on the final payload."""

    def __init__(
        self, config: ValidatorConfig, channel: grpc.aio.Channel, on_check: CheckHook | None
    ) -> None:
        self.config = config
        self._stub = vgrpc.ValidatorServiceStub(channel)
        self._verdicts = Verdicts(config, on_check)

    async def run(
        self, facts: ResponseFacts, final_text: str, tool_calls: Sequence[pb.ToolCall] = ()
    ) -> ValidatorVerdict:
        started = time.perf_counter()
        budget = _budget(self.config, facts.deadline)
        request = facts.request(self.config, final_text)
        request.tool_calls.extend(tool_calls)
        try:
            async with asyncio.timeout(budget):
                answer = await self._stub.Validate(request, timeout=budget)
        except TimeoutError:
            return self._verdicts.timed_out(time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return self._verdicts.failed_call(error, time.perf_counter() - started)
        latency = time.perf_counter() - started
        if not isinstance(answer, vpb.ValidateResponse):  # grpc hands back None for bytes
            report(self.config, "an answer that is not a ValidateResponse")  # that do not parse
            return self._verdicts.error("VALIDATOR_BAD_ANSWER", "answered garbage", latency)
        return self._verdicts.answer(answer, latency)


class StreamCheck:
    """A stream-mode validator: one `ValidateStream` call for the response's life."""

    def __init__(
        self,
        on_fail: Callable[[ValidatorVerdict], None],
        config: ValidatorConfig,
        channel: grpc.aio.Channel,
        facts: ResponseFacts,
        on_check: CheckHook | None,
    ) -> None:
        self.config = config
        self._on_fail = on_fail
        self._verdicts = Verdicts(config, on_check)
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
        except Exception:  # the call broke: its reader reports how (status, or garbage)
            return

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
            report(self.config, "an answer that is not a ValidateStreamResponse")
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
            self._on_fail(verdict)
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
