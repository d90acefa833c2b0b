"""One log line per kind of event per interval, however often it happens.

Some events are caused by callers (a malformed request, a handshake with a
wrong certificate) and cost the server nothing to refuse; logged once per
occurrence they become a flood anyone can cause, burying the lines that
matter. Each kind logs at most once per interval, and the next line says how
many were left out in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        #: kind -> (time of the last line, occurrences left out since).
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, kind: str, message: str, *args: object) -> bool:
        """Logs `message` unless `kind` was logged within the interval; True if logged."""
        left_out = self._left_out(kind)
        if left_out is None:
            return False
        suffix = f" ({left_out} more since the last such line)" if left_out else ""
        self._logger.log(level, message + suffix, *args)
        return True

    def admit(self, kind: str) -> int | None:
        """For a line someone else logs (a logging filter): None to drop it, else
        how many of its kind were dropped since the last one let through."""
        return self._left_out(kind)

    def _left_out(self, kind: str) -> int | None:
        """None within the interval (counted); else how many were left out."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self._interval:
            self._last[kind] = (last[0], last[1] + 1)
            return None
        if len(self._last) > 1024:  # kinds come from messages: keep the map small
            self._last.clear()
        self._last[kind] = (now, 0)
        return last[1] if last is not None else 0
