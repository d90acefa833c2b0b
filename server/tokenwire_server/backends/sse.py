"""Server-Sent Events decoding for OpenAI-compatible streams.

Follows the WHATWG event-stream rules the upstreams rely on: lines end with
LF, CRLF or CR; `:` lines are comments (keep-alives); `data:` lines of one
event are joined with newlines; an empty line ends the event; a field's
single leading space is dropped; other fields are ignored.

The decoder is fed whole network reads and returns every event they
complete, so a read carrying forty tokens costs one pass over a list instead
of forty trips through stacked async generators: at line rate the layers a
token passes through are most of what a gateway spends on it. Event data
stays bytes, which is what the JSON parser wants anyway.
"""

from __future__ import annotations

_CR = b"\r"
_LF = b"\n"


class SSEDecoder:
    """Incremental: `feed` each read, `close` at the end of the body."""

    __slots__ = ("_data", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event this read completes, in order."""
        buffer = self._pending + chunk if self._pending else chunk
        trailing_cr = False
        if _CR in buffer:
            # A CR at the very end may be the first half of a CRLF split across reads.
            trailing_cr = buffer.endswith(_CR)
            if trailing_cr:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", _LF).replace(_CR, _LF)
        lines = buffer.split(_LF)
        self._pending = lines.pop()
        if trailing_cr:
            lines.append(self._pending)
            self._pending = _CR
        return self._lines(lines)

    def close(self) -> list[bytes]:
        """What the end of the body completes: a last unterminated line and event.

        The standard drops an event the body ends inside; upstreams that omit
        the final blank line are common enough that keeping it is kinder.
        """
        pending = self._pending.rstrip(_CR)
        self._pending = b""
        events = self._lines([pending]) if pending else []
        if self._data:
            events.append(_LF.join(self._data))
            self._data = []
        return events

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(_LF.join(data))
                    data = self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                data.append(value)
            elif line == b"data":
                data.append(b"")
        return events
