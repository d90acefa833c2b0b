"""Client-side enforcement of the stream contract, shared by the sync and async clients.

The server promises contiguous sequences, exact byte offsets and a verified
`Completed`; this module checks each promise instead of trusting it, so a
caller either gets a text that provably equals the server's final payload or
an exception saying why not. A divergence reported by the server becomes an
explicit `Retraction` event before the `Completion`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

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


Event = Chunk | Heartbeat | Retraction | Completion


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
            return [self._chunk(message.chunk)]
        if kind == "heartbeat":
            self._response_id = self._response_id or message.heartbeat.response_id
            return [Heartbeat()]
        if kind == "completed":
            return self._completed(message.completed)
        raise ProtocolError(f"unknown event {kind!r}", last_sequence=self.last_sequence)

    def _chunk(self, chunk: pb.TokenChunk) -> Chunk:
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
        self._response_id = chunk.response_id
        data = chunk.text.encode()
        self._parts.append(data)
        self._offsets.append(self._next_offset)
        self._digest.update(data)
        self._next_sequence += 1
        self._next_offset += len(data)
        return Chunk(chunk.sequence, chunk.text, chunk.text_offset, chunk.token_count, chunk)

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
            retraction = Retraction(
                from_sequence=from_sequence,
                from_offset=len(kept),
                kept_text=kept.decode(),
                final_text=text,
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
        )
        events.append(Completion(self.result))
        return events


def worth_resuming(error: TokenwireError) -> bool:
    """A dropped connection (no tokenwire ErrorInfo), not a response that failed."""
    return error.code == grpc.StatusCode.UNAVAILABLE and not error.domain


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
    )
