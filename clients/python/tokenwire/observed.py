"""What a client saw servers (or the proxies between) do wrong, counted per client.

Every `Client` / `AsyncClient` counts, from the moment it is made, the
ordering violations its streams met (a sequence gap or repeat, an offset that
does not follow the text received, any event after `Completed`) and the stalls
(a stream silent, not even a heartbeat, for longer than the client's
`stall_timeout`). Read them as plain ints on `client.observed`, or pass
`on_observation` to hear of each one as it happens, and export them to your
own metrics; nothing here needs a metrics library:

    client = Client(target, on_observation=lambda o: counter.labels(o.kind).inc())
    ...
    client.observed.ordering_violations, client.observed.stalls

A violation also raises `ProtocolError` in the stream that met it (the counter
says it happened; the exception stops the caller from trusting the text). A
stall does not end the stream: the client's deadline still does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields

log = logging.getLogger("tokenwire")

#: Observation.kind -> the Observed counter it adds one to.
COUNTERS = {
    "sequence_gap": "sequence_gaps",
    "sequence_repeat": "sequence_repeats",
    "offset_mismatch": "offset_mismatches",
    "event_after_completed": "events_after_completed",
    "stall": "stalls",
}


@dataclass
class Observed:
    """Counts since the client was made; each only ever grows."""

    #: A chunk whose sequence skipped ahead (or a `Completed` naming chunks never received).
    sequence_gaps: int = 0
    #: A chunk whose sequence was one already received (or earlier).
    sequence_repeats: int = 0
    #: A chunk in sequence whose byte offset is not where the text so far ends.
    offset_mismatches: int = 0
    #: Anything the server sent after `Completed`.
    events_after_completed: int = 0
    #: A stream silent for longer than `stall_timeout` (counted once per silence).
    stalls: int = 0

    @property
    def ordering_violations(self) -> int:
        """Gaps, repeats, offset mismatches and events after `Completed` together."""
        return (
            self.sequence_gaps
            + self.sequence_repeats
            + self.offset_mismatches
            + self.events_after_completed
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Observation:
    """One thing counted: `kind` is a key of `COUNTERS` ("sequence_gap", "stall", ...)."""

    kind: str
    response_id: str
    #: The last sequence the stream held when it happened.
    last_sequence: int
    detail: str


ObservationHook = Callable[[Observation], None]


class Observer:
    """A client's counters and hook; safe to use from several threads.

    The hook runs in the thread (or event loop) that noticed: a stream's own
    for a violation, the client's watch for a stall. An exception it raises is
    logged and otherwise ignored, so a broken exporter cannot break a stream.
    """

    def __init__(self, hook: ObservationHook | None = None) -> None:
        self.counts = Observed()
        self._hook = hook
        self._lock = threading.Lock()

    def record(self, kind: str, response_id: str, last_sequence: int, detail: str) -> None:
        name = COUNTERS[kind]
        with self._lock:
            setattr(self.counts, name, getattr(self.counts, name) + 1)
        if self._hook is not None:
            try:
                self._hook(Observation(kind, response_id, last_sequence, detail))
            except Exception:
                log.exception("tokenwire: the on_observation hook failed on %s", kind)
