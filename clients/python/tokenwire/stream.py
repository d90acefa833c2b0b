"""Client-side enforcement of the stream contract, shared by the sync and async clients.

The server promises contiguous sequences, exact byte offsets and a verified
`Completed`; this module checks each promise instead of trusting it, so a
caller either gets a text that provably equals the server's final payload or
an exception saying why not. A divergence reported by the server becomes an
explicit `Retraction` event before the `Completion`.

Tool calls travel as fragments (`TokenChunk.tool_call`) in the same sequence
as the text: each is checked like a chunk (sequence, `text_offset`, which
does not advance on a fragment) and placed by its `arguments_offset`, and the
calls assembled from them are checked against `Completed.tool_calls`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tokenwire.errors import IntegrityError, ProtocolError, TokenwireError
from tokenwire.v1 import respond_pb2 as pb


@dataclass(frozen=True)
class Chunk:
    """A piece of governed text, in order."""

    sequence: int
    text: str
    text_offset: int
    token_count: int
    message: pb.TokenChunk


@dataclass(frozen=True)
class ToolCall:
    """A tool call: as assembled so far from its fragments, or as `Completed` reports it.

    `arguments` is JSON text (complete only once `complete` is True: the
    final, governed call from `Completed.tool_calls`). `id` and `name` come
    with a call's first fragment; a stream resumed by hand after it knows them
    only from `Completed`.
    """

    index: int
    id: str
    name: str
    arguments: str
    complete: bool = False

    def parsed_arguments(self) -> Any:
        """The arguments as Python values (`json.loads`); {} when empty."""
        return json.loads(self.arguments) if self.arguments else {}

    def to_proto(self) -> pb.ToolCall:
        """As the wire's `ToolCall`, e.g. for the assistant turn of the next request."""
        return pb.ToolCall(id=self.id, name=self.name, arguments=self.arguments)


@dataclass(frozen=True)
class ToolCallFragment:
    """One piece of a tool call, in order: a chunk that carries no text.

    `arguments` is this piece, placed at byte `arguments_offset` of the call's
    arguments; `call` is the call as held after it. `id` and `name` are set
    on a call's first fragment only.
    """

    sequence: int
    index: int
    id: str
    name: str
    arguments: str
    arguments_offset: int
    call: ToolCall
    message: pb.TokenChunk

    @property
    def first(self) -> bool:
        """True on the call's first fragment (it names the call)."""
        return self.arguments_offset == 0 and bool(self.name or self.id)


@dataclass(frozen=True)
class Heartbeat:
    """The server is alive; generation is silent."""


@dataclass(frozen=True)
class Retraction:
    """The server's final payload differs from what was streamed.

    Drop every chunk from `from_sequence` on (their text starts at byte
    `from_offset`); `final_text` is the payload that replaces the whole answer.
    """

    from_sequence: int
    from_offset: int
    kept_text: str
    final_text: str
    #: The calls as held before `from_sequence` (fragments from it on are dropped too).
    kept_tool_calls: tuple[ToolCall, ...] = ()
    #: `Completed.tool_calls`: the calls that replace every call streamed.
    final_tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Result:
    """The verified outcome of a call."""

    text: str
    sha256: str
    completed: pb.Completed
    chunk_count: int
    retraction: Retraction | None = None
    request_id: str = ""
    #: Non-zero when the stream was resumed by hand after this sequence: `text`
    #: then holds only what came after it (the server still verified the whole).
    resumed_after: int = 0
    #: The final, governed tool calls (`Completed.tool_calls`), each complete.
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def checks(self) -> list[pb.VerificationCheck]:
        """`Completed.verification.checks`: integrity, json_schema, tool_arguments, validators."""
        return list(self.completed.verification.checks)

    @property
    def checks_passed(self) -> bool:
        return bool(self.completed.verification.checks_passed)

    @property
    def verified(self) -> bool:
        """True when the text we hold equals the server's final payload by SHA-256."""
        return hashlib.sha256(self.text.encode()).hexdigest() == self.sha256

    @property
    def time_to_first_token(self) -> float:
        return self.completed.timing.time_to_first_token.ToNanoseconds() / 1e9

    @property
    def total_time(self) -> float:
        return self.completed.timing.total.ToNanoseconds() / 1e9


@dataclass(frozen=True)
class Completion:
    """The last event of a stream."""

    result: Result


Event = Chunk | ToolCallFragment | Heartbeat | Retraction | Completion


@dataclass
class _HeldCall:
    """A tool call's fragments as received: (sequence, bytes) in order."""

    index: int
    id: str = ""
    name: str = ""
    #: Byte of the arguments where the first fragment held here starts (0
    #: unless the stream was resumed by hand after the call began).
    start: int = 0
    parts: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0

    def arguments(self, before_sequence: int | None = None) -> bytes:
        return b"".join(
            data
            for sequence, data in self.parts
            if before_sequence is None or sequence < before_sequence
        )

    def snapshot(self, before_sequence: int | None = None) -> ToolCall:
        return ToolCall(self.index, self.id, self.name, self.arguments(before_sequence).decode())


def final_tool_calls(completed: pb.Completed) -> tuple[ToolCall, ...]:
    """`Completed.tool_calls` as complete `ToolCall`s (index: position in the list)."""
    return tuple(
        ToolCall(index, call.id, call.name, call.arguments, complete=True)
        for index, call in enumerate(completed.tool_calls)
    )


@dataclass
class StreamAssembler:
    """Checks and reassembles one response's events."""

    request_id: str = ""
    #: Resuming by hand: the caller holds chunks 1..n already (but not here).
    resumed_after: int = 0
    _parts: list[bytes] = field(default_factory=list)
    _offsets: list[int] = field(default_factory=list)
    _next_sequence: int = 1
    _next_offset: int = 0
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    _response_id: str = ""
    _calls: dict[int, _HeldCall] = field(default_factory=dict)
    result: Result | None = None
    #: Told of each ordering violation before it is raised: (kind, detail), the
    #: kinds of `tokenwire.observed.COUNTERS`. The clients set it to count them.
    observe: Callable[[str, str], None] | None = None

    def __post_init__(self) -> None:
        if self.resumed_after:
            self._next_sequence = self.resumed_after + 1
            self._next_offset = -1  # learnt from the first chunk

    @property
    def last_sequence(self) -> int:
        return self._next_sequence - 1

    @property
    def response_id(self) -> str:
        return self._response_id

    @property
    def text(self) -> str:
        """The text held so far (the final text once completed)."""
        if self.result is not None:
            return self.result.text
        return b"".join(self._parts).decode()

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls held so far, by index: arguments as far as they came;
        once completed, the final calls from `Completed` (each `complete`)."""
        if self.result is not None:
            return list(self.result.tool_calls)
        return [self._calls[index].snapshot() for index in sorted(self._calls)]

    def resume_request(self) -> pb.StreamRespondRequest:
        """The request that continues this stream after what it holds."""
        return pb.StreamRespondRequest(
            resume=pb.ResumeFrom(response_id=self._response_id, after_sequence=self.last_sequence)
        )

    def _violation(self, kind: str, detail: str) -> ProtocolError:
        if self.observe is not None:
            self.observe(kind, detail)
        return ProtocolError(detail, last_sequence=self.last_sequence)

    def feed(self, message: pb.StreamRespondResponse) -> list[Event]:
        """Takes one wire event; returns the events a caller should see."""
        if self.result is not None:
            raise self._violation("event_after_completed", "event after Completed")
        kind = message.WhichOneof("event")
        if kind == "chunk":
            if message.chunk.HasField("tool_call"):
                return [self._fragment(message.chunk)]
            return [self._chunk(message.chunk)]
        if kind == "heartbeat":
            self._response_id = self._response_id or message.heartbeat.response_id
            return [Heartbeat()]
        if kind == "completed":
            return self._completed(message.completed)
        raise ProtocolError(f"unknown event {kind!r}", last_sequence=self.last_sequence)

    def _place(self, chunk: pb.TokenChunk) -> None:
        """Checks a chunk's response id, sequence and text offset (text or fragment)."""
        if self._response_id and chunk.response_id != self._response_id:
            raise ProtocolError(
                f"chunk of response {chunk.response_id} inside {self._response_id}",
                last_sequence=self.last_sequence,
            )
        if self._next_offset == -1:
            self._next_offset = chunk.text_offset
        if chunk.sequence != self._next_sequence or chunk.text_offset != self._next_offset:
            if chunk.sequence > self._next_sequence:
                kind = "sequence_gap"
            elif chunk.sequence < self._next_sequence:
                kind = "sequence_repeat"
            else:
                kind = "offset_mismatch"
            raise self._violation(
                kind,
                f"expected chunk {self._next_sequence} at byte {self._next_offset}, got "
                f"{chunk.sequence} at byte {chunk.text_offset}",
            )

    def _chunk(self, chunk: pb.TokenChunk) -> Chunk:
        self._place(chunk)
        self._response_id = chunk.response_id
        data = chunk.text.encode()
        self._parts.append(data)
        self._offsets.append(self._next_offset)
        self._digest.update(data)
        self._next_sequence += 1
        self._next_offset += len(data)
        return Chunk(chunk.sequence, chunk.text, chunk.text_offset, chunk.token_count, chunk)

    def _fragment(self, chunk: pb.TokenChunk) -> ToolCallFragment:
        """A tool-call fragment: in sequence like a chunk, at the text offset
        (which it does not advance), and at its call's `arguments_offset`."""
        self._place(chunk)
        delta = chunk.tool_call
        if chunk.text:
            raise ProtocolError(
                f"chunk {chunk.sequence} carries both text and a tool-call fragment",
                last_sequence=self.last_sequence,
            )
        call = self._calls.get(delta.index)
        if call is None:
            # Calls are numbered in the order they begin; a stream resumed by
            # hand may begin inside any call (the earlier ones are the caller's).
            if not self.resumed_after and delta.index != len(self._calls):
                raise ProtocolError(
                    f"tool call #{delta.index} begins before #{len(self._calls)}",
                    last_sequence=self.last_sequence,
                )
            start = delta.arguments_offset if self.resumed_after else 0
            call = _HeldCall(delta.index, start=start)
        expected = call.start + call.size
        if delta.arguments_offset != expected:
            raise self._violation(
                "offset_mismatch",
                f"expected tool call #{delta.index} arguments at byte {expected}, got chunk "
                f"{chunk.sequence} at byte {delta.arguments_offset}",
            )
        for what, held, got in (("id", call.id, delta.id), ("name", call.name, delta.name)):
            if held and got and held != got:
                raise ProtocolError(
                    f"tool call #{delta.index} {what} {got!r} in chunk {chunk.sequence}, "
                    f"was {held!r}",
                    last_sequence=self.last_sequence,
                )
        call.id = call.id or delta.id
        call.name = call.name or delta.name
        self._calls[delta.index] = call
        self._response_id = chunk.response_id
        data = delta.arguments.encode()
        call.parts.append((chunk.sequence, data))
        call.size += len(data)
        # A fragment holds no text: an empty part keeps `_parts` indexed by sequence.
        self._parts.append(b"")
        self._offsets.append(self._next_offset)
        self._next_sequence += 1
        return ToolCallFragment(
            sequence=chunk.sequence,
            index=delta.index,
            id=delta.id,
            name=delta.name,
            arguments=delta.arguments,
            arguments_offset=delta.arguments_offset,
            call=call.snapshot(),
            message=chunk,
        )

    def _check_calls(self, final: tuple[ToolCall, ...], before_sequence: int | None) -> None:
        """Each call held (its fragments before `before_sequence`, or all) must
        be the final call of its index, or with a retraction a prefix of it."""
        finals = {call.index: call for call in final}
        for index in sorted(self._calls):
            held = self._calls[index]
            arguments = held.arguments(before_sequence)
            if before_sequence is not None and held.parts[0][0] >= before_sequence:
                continue  # every fragment of it was retracted
            target = finals.get(index)
            if target is None:
                raise IntegrityError(
                    f"tool call #{index} was streamed but is not in Completed.tool_calls",
                    last_sequence=self.last_sequence,
                )
            if (held.id and held.id != target.id) or (held.name and held.name != target.name):
                raise IntegrityError(
                    f"tool call #{index} streamed as {held.id} {held.name}, "
                    f"Completed says {target.id} {target.name}",
                    last_sequence=self.last_sequence,
                )
            whole = target.arguments.encode()
            if before_sequence is None and arguments != whole:
                raise IntegrityError(
                    f"tool call #{index}: its fragments differ from its final arguments",
                    last_sequence=self.last_sequence,
                )
            if before_sequence is not None and not whole.startswith(arguments):
                raise IntegrityError(
                    f"tool call #{index}: fragments before {before_sequence} are not a "
                    "prefix of its final arguments",
                    last_sequence=self.last_sequence,
                )
        if before_sequence is None:
            missing = [call.index for call in final if call.index not in self._calls]
            if missing:
                raise IntegrityError(
                    f"tool calls {missing} are in Completed but were never streamed",
                    last_sequence=self.last_sequence,
                )

    def _completed(self, completed: pb.Completed) -> list[Event]:
        streamed = self._digest.hexdigest()
        if completed.last_sequence != self.last_sequence:
            detail = (
                f"Completed names last sequence {completed.last_sequence}, "
                f"received {self.last_sequence}"
            )
            if completed.last_sequence > self.last_sequence:
                raise self._violation("sequence_gap", detail)
            raise ProtocolError(detail, last_sequence=self.last_sequence)
        if self._response_id and completed.response_id != self._response_id:
            raise ProtocolError(
                f"Completed of response {completed.response_id} ends {self._response_id}"
            )
        if completed.chunk_count != self.last_sequence:
            raise ProtocolError(
                f"Completed counts {completed.chunk_count} chunks, received {self.last_sequence}"
            )
        events: list[Event] = []
        status = completed.verification.status
        final_calls = final_tool_calls(completed)
        if self.resumed_after:
            if status not in (pb.VERIFICATION_STATUS_VERIFIED, pb.VERIFICATION_STATUS_DIVERGED):
                raise ProtocolError(f"Completed without a verification result ({status})")
            self.result = Result(
                text=b"".join(self._parts).decode(),
                sha256=completed.final_sha256,
                completed=completed,
                chunk_count=self.last_sequence,
                request_id=self.request_id or completed.request_id,
                resumed_after=self.resumed_after,
                tool_calls=final_tool_calls(completed),
            )
            return [Completion(self.result)]
        if status == pb.VERIFICATION_STATUS_VERIFIED:
            if streamed != completed.final_sha256:
                raise IntegrityError(
                    f"received text hashes to {streamed}, server says {completed.final_sha256}",
                    last_sequence=self.last_sequence,
                )
            text = b"".join(self._parts).decode()
            if completed.final_text and completed.final_text != text:
                raise IntegrityError("final_text differs from the verified stream")
            if final_calls or not self._calls:
                self._check_calls(final_calls, None)
            else:
                # Completed without its calls (as final_text may be omitted): the
                # verified fragments are the calls.
                final_calls = tuple(
                    ToolCall(c.index, c.id, c.name, c.arguments, complete=True)
                    for c in self.tool_calls
                )
            retraction = None
        elif status == pb.VERIFICATION_STATUS_DIVERGED:
            text = completed.final_text
            if hashlib.sha256(text.encode()).hexdigest() != completed.final_sha256:
                raise IntegrityError("final_text does not hash to final_sha256")
            from_sequence = completed.verification.retract_from_sequence
            if not 1 <= from_sequence <= self._next_sequence:
                raise ProtocolError(f"retraction from unknown sequence {from_sequence}")
            kept = b"".join(self._parts[: from_sequence - 1])
            if not text.encode().startswith(kept):
                raise IntegrityError(
                    f"chunks before {from_sequence} are not a prefix of the final text"
                )
            self._check_calls(final_calls, from_sequence)
            retraction = Retraction(
                from_sequence=from_sequence,
                from_offset=len(kept),
                kept_text=kept.decode(),
                final_text=text,
                kept_tool_calls=tuple(
                    call.snapshot(from_sequence)
                    for _, call in sorted(self._calls.items())
                    if call.parts[0][0] < from_sequence
                ),
                final_tool_calls=final_calls,
            )
            events.append(retraction)
        else:
            raise ProtocolError(f"Completed without a verification result ({status})")
        self.result = Result(
            text=text,
            sha256=completed.final_sha256,
            completed=completed,
            chunk_count=self.last_sequence,
            retraction=retraction,
            request_id=self.request_id or completed.request_id,
            tool_calls=final_calls,
        )
        events.append(Completion(self.result))
        return events


#: The one tokenwire reason that ends a call, not its response: the replica
#: stopped while a response shared through Redis went on elsewhere.
SERVER_STOPPING = "SERVER_STOPPING"


def worth_resuming(error: TokenwireError) -> bool:
    """A dropped connection (no tokenwire ErrorInfo) or a replica that stopped
    under a shared response, not a response that failed."""
    if error.code != grpc.StatusCode.UNAVAILABLE:
        return False
    return not error.domain or error.reason == SERVER_STOPPING


def unary_result(response: pb.RespondResponse, request_id: str = "") -> Result:
    """Checks a unary payload against its digest and verification."""
    completed = response.completed
    text = completed.final_text
    digest = hashlib.sha256(text.encode()).hexdigest()
    if completed.verification.status != pb.VERIFICATION_STATUS_VERIFIED:
        raise ProtocolError("unary payload is not verified")
    if digest != completed.final_sha256:
        raise IntegrityError(f"payload hashes to {digest}, server says {completed.final_sha256}")
    return Result(
        text=text,
        sha256=completed.final_sha256,
        completed=completed,
        chunk_count=0,
        request_id=request_id or completed.request_id,
        tool_calls=final_tool_calls(completed),
    )
