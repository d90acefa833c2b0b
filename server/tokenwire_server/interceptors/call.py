"""The state of one RespondService call, as one typed object.

The chain (chain.py) creates a `Call` before the first stage runs and hands
the same object inward: each stage's `enter` fills what it owns (the tenant,
the span and trace id, the request id, the deadline), in the chain's order,
and the servicer receives it as an argument. Nothing flows back by writing a
shared variable: the servicer tells the outer layers what it learnt through
`report`, the one hook, with a `ResponseFacts` (which response this call
reads) or a `Progress` (how far a call that ends without `Completed` got).
The chain alone counts what leaves (`sent`), so every stage reads one tally.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span

from tokenwire_server.audit.records import TokenEvent
from tokenwire_server.delivery.chunks import ChunkRecord
from tokenwire_server.governance.scrub import scrub, scrub_labels

#: The chunks a resumed call's caller already holds.
ReplayPrefix = tuple[ChunkRecord, ...]


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """Which response the call reads, reported once the servicer knows it."""

    response_id: str
    model: str
    model_version: str
    #: The route that was asked; `Completed.serving.backend` differs after a fallback.
    backend: str
    policy_id: str
    policy_version: str
    prompt_tokens: int = 0
    #: The policy asks the audit trail for one small tuple per chunk.
    token_events: bool = False
    #: A resume: what the caller holds, so verification continues after it.
    replay_prefix: ReplayPrefix = ()


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a call got when it ends without `Completed`."""

    last_sequence: int
    completion_tokens: int
    error_reason: str = ""


@dataclass(slots=True)
class Sent:
    """What the chain let out, counted once for every stage."""

    chunks: int = 0
    heartbeats: int = 0
    #: Byte offset of the first chunk this call sent, and the end of the last one.
    first_offset: int = -1
    end_offset: int = 0

    @property
    def bytes(self) -> int:
        return self.end_offset - self.first_offset if self.first_offset >= 0 else 0


@dataclass(slots=True)
class SentToolCall:
    """One tool call as its fragments went out: (sequence, arguments) each."""

    id: str
    name: str
    fragments: list[tuple[int, str]] = field(default_factory=list)
    next_offset: int = 0

    @property
    def arguments(self) -> str:
        return "".join(text for _, text in self.fragments)


@dataclass(slots=True)
class Ledger:
    """The verification gate's account of the stream as the caller holds it."""

    texts: list[str] = field(default_factory=list)
    next_sequence: int = 1
    next_offset: int = 0
    completed: bool = False
    #: Tool calls by index, as their fragments went out.
    calls: list[SentToolCall] = field(default_factory=list)


@dataclass(slots=True)
class Call:
    method: str
    request: Any
    metadata: tuple[tuple[str, Any], ...]
    started: float = field(default_factory=time.monotonic)
    started_ns: int = field(default_factory=time.time_ns)
    #: The authenticated tenant ("" when authentication is off).
    tenant: str = ""
    #: The caller's own id (field, else a valid x-request-id header), "" when none.
    caller_request_id: str = ""
    #: The caller's id, else a generated one.
    request_id: str = ""
    #: `request_id` as logs, spans and audit rows keep it: scrubbed when it is
    #: the caller's free text, as it is when the server generated it.
    logged_request_id: str = ""
    trace_id: str = ""
    span: Span = INVALID_SPAN
    #: Absolute event-loop time by which the call must end.
    deadline: float | None = None
    #: Reported by the servicer (see `report`).
    facts: ResponseFacts | None = None
    progress: Progress = field(default_factory=lambda: Progress(0, 0))
    sent: Sent = field(default_factory=Sent)
    ledger: Ledger = field(default_factory=Ledger)
    #: One small tuple per chunk, when the policy asks the audit trail for them.
    token_events: list[TokenEvent] = field(default_factory=list)
    #: How the call ended, as a status name ("" while it runs); set by the chain.
    status: str = ""
    #: Work started early so it overlaps the upstream's first token (the
    #: response headers, the stream's opening audit row); the chain awaits it
    #: all before the first event, the unary answer or a failing status leaves.
    overlapped: list[asyncio.Future[None]] = field(default_factory=list)
    #: The audit trail has the call's last row (set by the audit stage).
    audit_ended: bool = False
    #: How many stages the call got past (their ending hooks run); set by the chain.
    entered: int = 0
    #: Who hears `report`: set by the chain from the stages that listen.
    listeners: tuple[Callable[[Call, ResponseFacts], None], ...] = ()
    scrubbed_labels: dict[str, str] | None = None

    def logged_labels(self) -> dict[str, str]:
        """The request's labels as records and logs keep them: scrubbed (~5 us a
        label), once per call however many records and lines carry them."""
        if self.scrubbed_labels is None:
            self.scrubbed_labels = scrub_labels(self.request.labels)
        return self.scrubbed_labels

    def logged_id(self, request_id: str) -> str:
        """A response's request id as records keep it (scrubbed once per call)."""
        return self.logged_request_id if request_id == self.request_id else scrub(request_id)

    def report(self, news: ResponseFacts | Progress) -> None:
        """The servicer's one way to tell the outer layers what it learnt."""
        if isinstance(news, Progress):
            self.progress = news
            return
        self.facts = news
        for listener in self.listeners:
            listener(self, news)
