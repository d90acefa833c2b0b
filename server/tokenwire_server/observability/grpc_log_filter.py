"""grpc's own Python log lines, sorted by whose doing they are and rate-limited.

grpc.aio logs with `_LOGGER.exception` (ERROR and a full traceback) for
events a caller causes and the server handles fine:

* `ExecuteBatchError raised in core by servicer method [...]`: a write or the
  final status failed because the call ended on the client's side (cancel,
  deadline, closed channel, reset connection) before grpc saw the close; grpc
  skips the line only when it saw the close first, so whether a hang-up logs
  an ERROR is a race (about 1 in 30 hang-ups during a large pending write).
  This server sets no send-size limit, the other way such a batch fails.
* `Unexpected [DecodeError] raised by servicer method [...]`: a request that
  does not parse on a method grpc parses itself (reflection streams; unary
  health is made tolerant by interceptors/malformed.py).

Each is one line without a traceback, at INFO (the client left) or WARNING
(a malformed request), so a hostile or flaky client cannot page anyone or
flood the log. Anything else grpc logs at ERROR is the server's own problem:
it keeps its level and its traceback (one JSON field), which is what the
person reading it at 2 a.m. needs. Every kind of line, whatever its level,
comes at most once per interval and says how many were left out since.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from tokenwire_server.observability.rate_limited_log import RateLimitedLog

#: Exceptions grpc raises when the peer has gone: nothing for the server to fix.
_PEER_GONE = frozenset({"ExecuteBatchError"})
_PEER_GONE_MESSAGES = ("ExecuteBatchError raised in core", "Failed sending error status")
#: An object's address in an exception's text: noise to the reader.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
#: Exceptions a malformed request causes while grpc parses it.
_MALFORMED = frozenset({"DecodeError", "UnicodeDecodeError"})


class GrpcNoiseFilter(logging.Filter):
    """A handler filter: lets each kind of grpc line through once per interval."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._limit = RateLimitedLog(logging.getLogger("grpc"), interval=interval, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("grpc"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        error_type = type(error).__name__ if error is not None else ""
        message = record.getMessage()
        # The kind: grpc formats its messages itself, up to the method name
        # (from the server's own method table); never the exception's text,
        # which holds per-call object addresses.
        kind = f"{error_type}:{message[:120]}"
        if error_type in _PEER_GONE or message.startswith(_PEER_GONE_MESSAGES):
            self._caller_caused(record, logging.INFO, "the call ended on the client's side", error)
        elif error_type in _MALFORMED:
            self._caller_caused(record, logging.WARNING, "malformed request", error)
        if record.levelno < logging.getLogger(record.name).getEffectiveLevel():
            return False  # lowered below the level the operator asked for
        left_out = self._limit.admit(f"{record.levelno}:{kind}")
        if left_out is None:
            return False
        if left_out:
            record.msg, record.args = f"{record.getMessage()} ({left_out} more since)", None
        return True

    @staticmethod
    def _caller_caused(
        record: logging.LogRecord, level: int, what: str, error: BaseException | None
    ) -> None:
        """One plain line: what happened, the exception in a few words, no traceback."""
        detail = f": {type(error).__name__}: {str(error)[:200]}" if error is not None else ""
        detail = _ADDRESS.sub("0x…", detail)
        record.msg, record.args = f"{what} ({record.getMessage()}{detail})", None
        record.exc_info = record.exc_text = None
        record.stack_info = None
        record.levelno, record.levelname = level, logging.getLevelName(level)
