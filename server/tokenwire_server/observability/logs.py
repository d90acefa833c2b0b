"""Process logging: one JSON object per line (python-json-logger), or plain text.

Response lines (logger `tokenwire.responses`) carry request id, response id,
trace id, model, verdict, chunk count and timings as fields; model text only
when `log_text` is on.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from tokenwire_server.governance.scrub import ScrubbingFilter
from tokenwire_server.observability.rate_limited_log import RateLimitedLog


class GrpcNoiseFilter(logging.Filter):
    """grpc's Python layer logs what callers cause as ERROR with a traceback:
    a request that does not parse for a streaming method (reflection), a
    servicer error. Each kind of such line is let through once per interval,
    with its exception as one line, and says how many were left out."""

    def __init__(self) -> None:
        super().__init__()
        self._limit = RateLimitedLog(logging.getLogger("grpc"))

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("grpc"):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info = record.exc_text = None
        # The kind: the message without the parts that vary per call.
        kind = record.getMessage()[:80]
        left_out = self._limit.admit(kind)
        if left_out:
            record.msg, record.args = f"{record.getMessage()} ({left_out} more since)", None
        return left_out is not None


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(GrpcNoiseFilter())  # before scrubbing: fewer lines to scrub
    handler.addFilter(ScrubbingFilter())  # no value leaves through a log line
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
