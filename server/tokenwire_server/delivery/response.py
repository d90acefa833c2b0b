"""The live state of one response: released text, the chunk log, and its one ending.

Generation (the producer) releases governed text into it; deliveries (the
consumers) cut that text into chunks and read the chunk log by position. A
chunk, once cut, never changes: its sequence, offset and text are what every
reader of the response sees, which is what makes replay and resume exact.

Chunks are cut when a reader asks, so a reader slower than the model gets the
tokens that piled up in one chunk (bounded by `max_pending_chars`, beyond which
generation waits) instead of a queue of tiny messages.

Ending is one terminal transition (finished, failed or cancelled); the first
caller wins and later calls are no-ops, so racing endings are safe.

Why one module: the ending, the readers and the shared log's ordering are
one state machine (the last reader leaving a running response, an ending that
must wait for its last chunk to be logged); released text waiting for a
reader is its own part (pending.py), as is the chunk record (chunks.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.delivery.chunks import (
    ChunkRecord,
    ChunkSequence,
    CompactChunks,
    ToolDelta,
    emitted_at_ns,
)
from tokenwire_server.delivery.packing import pack, unpack
from tokenwire_server.delivery.pending import PendingText, ToolPiece
from tokenwire_server.domain import (
    Action,
    DeliveryMode,
    DeliveryOptions,
    FinishReason,
    ModelInfo,
    ServingPath,
    ToolCall,
    Verdict,
    utf8_length,
)
from tokenwire_server.errors import ResponseCancelled, TokenwireError

if TYPE_CHECKING:
    from tokenwire_server.delivery.validation_path import ValidationPath

log = logging.getLogger(__name__)


class State(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished response reports in `Completed`."""

    final_text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    verdict: Verdict
    review_required: bool
    actions: tuple[Action, ...]
    path: ServingPath
    attempts: int
    backend: str
    #: `Completed.verification.checks` from the validation path (validators).
    checks: tuple[pb.VerificationCheck, ...] = ()
    #: No validator failed, an error under `fail_closed` included.
    checks_passed: bool = True
    #: The review an escalation rule opened: (review id, state name).
    review: tuple[str, str] | None = None
    #: Held for review: nothing of the text is released, `final_text` is empty.
    held: bool = False
    #: The final, governed tool calls, in the order they began.
    tool_calls: tuple[ToolCall, ...] = ()


#: The attributes an ended response keeps when packed: everything a reader,
#: a resumed or a retried call reads; not what only generation used (its task,
#: pending text, waiters, validation path, timers and callbacks).
_ENDED_STATE = (
    "response_id",
    "request_id",
    "model",
    "policy_id",
    "policy_version",
    "started_at",
    "first_token_at",
    "first_chunk_at",
    "chunks",
    "state",
    "outcome",
    "error",
    "tokens_generated",
    "_next_offset",
    "_released",
    "_calls",
    "tenant",
    "delivery",
    "resumable",
    "detach_window",
    "detached_chunk_tokens",
    "mode_used",
    "completed_message",
)
_FINAL_TEXT_FROM_OUTCOME = "completed_final_text_is_the_outcome's"


class _ToolCallState:
    """A call as released so far, and how much of it is cut into chunks."""

    __slots__ = ("cut_bytes", "id", "name", "parts")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.parts: list[str] = []
        self.cut_bytes = 0

    def call(self) -> ToolCall:
        return ToolCall(self.id, self.name, "".join(self.parts))


class LiveResponse:
    """One response's released text, chunk log and terminal state."""

    def __init__(
        self,
        *,
        response_id: str,
        request_id: str,
        model: ModelInfo,
        policy_id: str,
        policy_version: str,
        max_pending_chars: int,
    ) -> None:
        self.response_id = response_id
        self.request_id = request_id
        self.model = model
        self.policy_id = policy_id
        self.policy_version = policy_version
        self._loop = asyncio.get_running_loop()
        self.started_at = self._loop.time()
        self.first_token_at: float | None = None
        self.chunks: ChunkSequence = []
        self.state = State.RUNNING
        self.outcome: Outcome | None = None
        self.error: TokenwireError | None = None
        self.tokens_generated = 0
        #: Released text no reader has cut yet, and the backpressure budget on it.
        self.pending = PendingText(self._loop, max_pending_chars)
        self._next_offset = 0
        self._released: list[str] = []
        #: Tool calls released so far, by index.
        self._calls: list[_ToolCallState] = []
        self._waiters: list[asyncio.Future[bool]] = []
        #: What every `wait` raises from now on (`interrupt_readers`).
        self._interrupted: TokenwireError | None = None
        #: The generation task feeding this response, once started.
        self.task: asyncio.Task[None] | None = None
        self._stop_requested = False
        #: The tenant that started it; only it may resume, cancel or retry into it.
        self.tenant = ""
        #: How the first call asked for chunks; resumed and attached readers reuse it.
        self.delivery: DeliveryOptions | None = None
        #: A resumable response keeps generating for `detach_window` without readers.
        self.resumable = False
        self.detach_window = 0.0
        self.readers = 0
        self._detach_timer: asyncio.TimerHandle | None = None
        #: Tokens per chunk when generation cuts chunks itself (no reader attached).
        self.detached_chunk_tokens = 1
        #: Fixed by the first delivery, so every later reader sees the same shape.
        self.mode_used: DeliveryMode | None = None
        self.first_chunk_at: float | None = None
        #: The terminal message, built once so every reader gets the same one.
        self.completed_message: pb.Completed | None = None
        self._on_end: list[Callable[[LiveResponse], None]] = []
        #: A shared log (several replicas): chunks are written there before they are sent.
        self.log: ChunkLog | None = None
        self._log_ended = False
        #: Set by a store keeping the ended response: called once it is idle, packed.
        self._on_idle: Callable[[LiveResponse, bytes], None] | None = None
        #: Validators and escalation rules, when any apply (validation_path.py).
        self.validation: ValidationPath | None = None
        #: Set on a replica that only mirrors another's response: called when its
        #: last reader leaves (the mirror stops following; the owner goes on).
        self.on_orphaned: Callable[[LiveResponse], None] | None = None

    # ----- readers ---------------------------------------------------------

    def attach(self) -> Reader:
        """A call starts reading; generation no longer risks being orphaned."""
        self.readers += 1
        if self._detach_timer is not None:
            self._detach_timer.cancel()
            self._detach_timer = None
        return Reader(self)

    def _detach(self) -> None:
        self.readers -= 1
        if self.readers:
            return
        if self.on_orphaned is not None and self.log is None:
            self.on_orphaned(self)  # a mirror: generation is another replica's business
            return
        if self.done:
            self._log_end_when_complete()
            self._pack_if_idle()
            return
        if not self.resumable:
            self.stop_generation()
            return
        # Nobody reads: cut what is pending so the log holds it, and keep going
        # until the detach window closes without a new reader.
        self._cut_detached()
        self._detach_timer = self._loop.call_later(self.detach_window, self.stop_generation)

    def _log_end_when_complete(self) -> None:
        """Logs the ending once every chunk before it is logged (a shared log is ordered).

        Chunks are cut by readers; with none attached, what is pending is cut
        here, as the response would have been sent.
        """
        if self.log is None or self._log_ended or self.state is State.RUNNING:
            return
        if self.state is not State.FINISHED and self.mode_used is DeliveryMode.BUFFERED:
            # A buffered response that did not finish sends nothing: drop what it held.
            self.pending.drop()
        whole_due = self.state is State.FINISHED and not self.chunks and self._whole_chunk_due()
        if not self.readers:
            if whole_due:
                self.cut_whole()
                return  # cut_whole logs the ending
            while self.pending:
                self.cut_chunk(self.detached_chunk_tokens)
            if self._log_ended:
                return  # the last cut logged the ending
        if self.pending or whole_due:
            return  # a reader will cut the rest; the ending follows its last chunk
        self._log_ended = True
        self.log.end(self)

    def _whole_chunk_due(self) -> bool:
        """A reader will send the final payload as one chunk (buffered, or replaced)."""
        if self.outcome is not None and self.outcome.held:
            return False  # held for review: nothing of it leaves
        if self.mode_used is not DeliveryMode.STREAM:
            return True
        return self.replaced

    @property
    def replaced(self) -> bool:
        """The final payload (text or tool calls) is not what generation released."""
        outcome = self.outcome
        if outcome is None or self.state is not State.FINISHED:
            return False
        if outcome.final_text != self.released_text:
            return True
        return bool(outcome.tool_calls or self._calls) and (
            outcome.tool_calls != self.released_tool_calls
        )

    def _cut_detached(self) -> None:
        if self.mode_used is DeliveryMode.BUFFERED:
            return
        if self.pending:
            self.choose_mode(DeliveryMode.STREAM)  # chunks exist now: it is a stream
        while self.pending:
            self.cut_chunk(self.detached_chunk_tokens)

    def keep_alive(self) -> None:
        """A reader elsewhere (another replica) still reads: restart the detach window."""
        if self._detach_timer is not None and not self.done:
            self._detach_timer.cancel()
            self._detach_timer = self._loop.call_later(self.detach_window, self.stop_generation)

    def pack_when_idle(self, on_packed: Callable[[LiveResponse, bytes], None]) -> None:
        """Called by a store that keeps this ended response (for resume and
        retries, thousands at once): once nothing can add a chunk (no reader,
        nothing pending), the response is packed into one bytes object
        (packing.py) and handed to `on_packed`, so the store can keep that and
        let this object, and the hundreds of small objects it holds, go."""
        self._on_idle = on_packed
        self._pack_if_idle()

    def _pack_if_idle(self) -> None:
        on_packed = self._on_idle
        if on_packed is None or not self.done or self.readers:
            return
        if self.pending and self.delivery is not None:
            return  # a stream's reader may still cut it into chunks
        # (A unary response's pending text is never cut: it is not a stream.)
        self._on_idle = None
        released = self.released_text
        if self.chunks and isinstance(self.chunks, list):
            compact = CompactChunks(self.chunks)
            self.chunks = compact
            if compact.text == released:
                released = compact.text  # one string for both
        self._released = [released]
        outcome = self.outcome
        if outcome is not None and outcome.final_text == released:
            self.outcome = dataclasses.replace(outcome, final_text=released)
        self.task = None
        self._on_end = []
        try:
            packed = pack(self._ended_state())
        except Exception:  # a state that does not pickle is a bug; the response stays whole
            log.exception("response %s could not be packed", self.response_id)
            return
        on_packed(self, packed)

    def _ended_state(self) -> dict[str, object]:
        """What a reader of the ended response needs: its log, ending and how it was delivered.

        `Completed.final_text` is the outcome's final text again: it is left out
        and put back when unpacked."""
        state = {name: getattr(self, name) for name in _ENDED_STATE}
        completed, outcome = self.completed_message, self.outcome
        if (
            completed is not None
            and outcome is not None
            and completed.final_text
            and completed.final_text == outcome.final_text
        ):
            trimmed = pb.Completed()
            trimmed.CopyFrom(completed)
            trimmed.ClearField("final_text")
            state["completed_message"] = trimmed
            state[_FINAL_TEXT_FROM_OUTCOME] = True
        return state

    @classmethod
    def unpacked(cls, packed: bytes) -> LiveResponse:
        """The ended response `pack_when_idle` packed, as readers and retries see it."""
        state = unpack(packed)
        response = cls(
            response_id="",
            request_id="",
            model=ModelInfo("", "", ""),
            policy_id="",
            policy_version="",
            max_pending_chars=0,
        )
        text_from_outcome = state.pop(_FINAL_TEXT_FROM_OUTCOME, False)
        for name, value in state.items():
            setattr(response, name, value)
        if text_from_outcome:
            assert response.completed_message is not None and response.outcome is not None
            response.completed_message.final_text = response.outcome.final_text
        return response

    def on_end(self, callback: Callable[[LiveResponse], None]) -> None:
        self._on_end.append(callback)

    @property
    def logged_bytes(self) -> int:
        """UTF-8 bytes of all chunks so far: the offset the next chunk starts at."""
        return self._next_offset

    @property
    def retained_bytes(self) -> int:
        """Roughly what keeping this response costs: chunks, released text, final text."""
        final = utf8_length(self.outcome.final_text) if self.outcome is not None else 0
        return 2 * self._next_offset + final

    def stop_generation(self) -> None:
        """Cancels generation if it still runs; safe to call any number of times.

        It cancels once: a second cancel would interrupt the backend's own
        cleanup (closing an upstream HTTP stream) that the first one started.
        """
        if self.task is not None and not self.task.done() and not self._stop_requested:
            self._stop_requested = True
            self.task.cancel()

    # ----- producer side -------------------------------------------------

    def release(self, text: str, actions: tuple[Action, ...] = (), tokens: int = 1) -> None:
        """Adds governed text (from `tokens` generated tokens) that may now be sent."""
        self._generated(tokens)
        if self.pending.add(text, actions, tokens):
            self._released.append(text)
            if self.validation is not None:
                self.validation.feed(text)
            self._released_more()

    def release_tool(
        self,
        index: int,
        arguments: str,
        actions: tuple[Action, ...] = (),
        tokens: int = 1,
        id: str = "",
        name: str = "",
    ) -> None:
        """Adds a governed fragment of tool call `index` (its `id` and `name`
        with the first one); it waits for a reader in order with the text."""
        self._generated(tokens)
        call = self._call_state(index)
        if id:
            call.id = id
        if name:
            call.name = name
        call.parts.append(arguments)
        self.pending.add_tool(ToolPiece(index, id, name, arguments, actions), tokens)
        self._released_more()

    def _call_state(self, position: int) -> _ToolCallState:
        """Call `position`'s state, begun (with those before it) if it was not."""
        calls = self._calls
        while len(calls) <= position:
            calls.append(_ToolCallState())
        return calls[position]

    @property
    def released_tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls as released so far (governed), in the order they began."""
        return tuple(call.call() for call in self._calls)

    def release_tokens(self, tokens: list[str]) -> None:
        """Adds tokens that passed governance untouched, each its own pending piece
        (so `max_tokens_per_chunk` can be honoured), in one step: the same state
        as `release` per token, without the per-call overhead."""
        if not all(tokens):  # an empty token carries over: the general path knows how
            for token in tokens:
                self.release(token)
            return
        self._generated(len(tokens))
        self.pending.add_tokens(tokens)
        self._released.extend(tokens)
        if self.validation is not None:
            self.validation.feed("".join(tokens))
        self._released_more()

    def count_tokens(self, tokens: int) -> None:
        """Generated tokens that released nothing yet (governance holds them)."""
        self._generated(tokens)

    def _generated(self, tokens: int) -> None:
        self.tokens_generated += tokens
        if self.first_token_at is None:
            self.first_token_at = self._loop.time()

    def _released_more(self) -> None:
        if self._waiters:
            self._wake()
        if not self.readers and self.resumable:
            self._cut_detached()

    def unbounded(self) -> None:
        """No streaming reader will take pending text (unary, BUFFERED): never wait for one."""
        self.pending.unbounded()

    def settle(self) -> None:
        """At the end, tokens and actions that came with no text ride on an empty chunk."""
        self.pending.settle()
        if not self.readers and self.resumable:
            self._cut_detached()

    async def wait_for_space(self) -> None:
        """Backpressure: returns once a reader has taken enough pending text."""
        await self.pending.wait_for_space(lambda: self.state is State.RUNNING)

    def choose_mode(self, mode: DeliveryMode) -> DeliveryMode:
        """How this response is delivered, decided once: the first choice stands
        (BUFFERED asked for, AUTO settled by the first reader, STREAM once chunks
        were cut without one), and every later reader and replica gets it."""
        if self.mode_used is None:
            self.mode_used = mode
        return self.mode_used

    def finish(self, outcome: Outcome) -> bool:
        return self._end(State.FINISHED, outcome=outcome)

    def fail(self, error: TokenwireError) -> bool:
        return self._end(State.FAILED, error=error)

    def cancel(self) -> bool:
        return self._end(
            State.CANCELLED, error=ResponseCancelled("generation was stopped before it finished")
        )

    def _end(
        self, state: State, outcome: Outcome | None = None, error: TokenwireError | None = None
    ) -> bool:
        if self.state is not State.RUNNING:
            return False
        self.state = state
        self.outcome = outcome
        self.error = error
        if self._detach_timer is not None:
            self._detach_timer.cancel()
            self._detach_timer = None
        self._wake()
        self._log_end_when_complete()
        for callback in self._on_end:
            callback(self)
        self.pending.free()
        return True

    # ----- consumer side -------------------------------------------------

    @property
    def released_text(self) -> str:
        return "".join(self._released)

    @property
    def has_pending(self) -> bool:
        return bool(self.pending)

    @property
    def done(self) -> bool:
        return self.state is not State.RUNNING

    async def wait_ended(self) -> None:
        while not self.done:
            await self.wait(None)

    async def wait(self, until: float | None) -> bool:
        """Waits for new text or the ending; False when `until` (loop time) passed first."""
        if self._interrupted is not None:
            raise self._interrupted
        if until is not None and until <= self._loop.time():
            return False
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append(waiter)
        timer = None if until is None else self._loop.call_at(until, _expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return waiter.result()

    def interrupt_readers(self, error: TokenwireError) -> None:
        """Ends every reader's wait, now and later, with `error`, leaving the
        response itself as it is (a stopping replica's readers of a response
        that another replica can continue)."""
        self._interrupted = error
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def wake_readers(self) -> None:
        """Returns every pending `wait` early (True), e.g. to let a reader send a heartbeat."""
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    def cut_chunk(self, max_tokens: int) -> ChunkRecord:
        """Turns up to `max_tokens` pending tokens into the next chunk of the log."""
        record = self._append(*self.pending.take(max_tokens, self._next_offset))
        if not self.pending:
            self._log_end_when_complete()
        return record

    def cut_whole(self) -> list[ChunkRecord]:
        """The buffered delivery: the final text as one chunk (one empty chunk
        for an empty answer without tool calls), then each tool call whole."""
        outcome = self.outcome
        assert outcome is not None and not self.chunks
        self.pending.drop()
        records = []
        tokens = outcome.completion_tokens
        if outcome.final_text or not outcome.tool_calls:
            records.append(self._append(outcome.final_text, tokens, outcome.actions))
            tokens = 0
        for index, call in enumerate(outcome.tool_calls):
            piece = ToolPiece(index, call.id, call.name, call.arguments, ())
            self._call_state(index)
            records.append(self._append(call.arguments, tokens, (), piece))
            tokens = 0
        self._log_end_when_complete()
        return records

    def _append(
        self,
        text: str,
        tokens: int,
        actions: tuple[Action, ...],
        tool: ToolPiece | None = None,
    ) -> ChunkRecord:
        offset = self._next_offset
        chunks = self.chunks
        if tool is None:
            record = ChunkRecord(len(chunks) + 1, text, offset, tokens, actions, emitted_at_ns())
            self._next_offset = offset + utf8_length(text)
        else:
            call = self._calls[tool.position]
            delta = ToolDelta(tool.position, tool.id, tool.name, call.cut_bytes)
            call.cut_bytes += utf8_length(text)
            record = ChunkRecord(
                len(chunks) + 1, text, offset, tokens, actions, emitted_at_ns(), delta
            )
        chunks.append(record)
        if self._waiters:
            self._wake()
        if self.log is not None:
            self.log.append(record)
        return record

    def append_logged(self, record: ChunkRecord) -> None:
        """Adds a chunk another replica cut and logged."""
        tool = record.tool
        if tool is None:
            self._released.append(record.text)
            self._next_offset += utf8_length(record.text)
        else:
            call = self._call_state(tool.position)
            call.id, call.name = tool.id or call.id, tool.name or call.name
            call.parts.append(record.text)
            call.cut_bytes += utf8_length(record.text)
        self.chunks.append(record)
        if self._waiters:
            self._wake()

    def end_logged(
        self, state: State, outcome: Outcome | None, error: TokenwireError | None
    ) -> bool:
        """Applies an ending read from another replica's log."""
        return self._end(state, outcome=outcome, error=error)


class ChunkLog(Protocol):
    """Where a response's chunks and ending are written for other replicas."""

    def append(self, record: ChunkRecord) -> None: ...

    def end(self, response: LiveResponse) -> None: ...

    async def durable(self, sequence: int) -> None:
        """Returns once every chunk up to `sequence` is written."""


class Reader:
    """One call's hold on a response; `release` is safe to call more than once."""

    __slots__ = ("_response",)

    def __init__(self, response: LiveResponse) -> None:
        self._response: LiveResponse | None = response

    def release(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response._detach()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
