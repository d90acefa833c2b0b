"""Redaction for text the server writes outside the governed stream.

Error messages quote upstream bodies and caller input, log lines quote error
messages, and none of that passes through a response's policy. Every such
string goes through `scrub`: all built-in detectors, values replaced by their
type tag, and a value cut off at the end (by clipping or truncation) redacted
as if the text ended there. It is kept off the per-chunk path: errors and log
lines only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import regex

from tokenwire_server.domain import Operator
from tokenwire_server.governance.detectors import BUILTIN_DETECTORS
from tokenwire_server.governance.redaction import RedactionRule, Redactor


class Scrubber:
    """Redaction of free text by a set of built-in detectors."""

    def __init__(self, names: list[str]) -> None:
        detectors = [BUILTIN_DETECTORS[name] for name in names]
        self.redactor = Redactor(
            tuple(RedactionRule(d.name, d, Operator.REPLACE) for d in detectors),
            hash_key=None,
            max_holdback=1 << 20,
        )
        # What every value one of them redacts contains (a digit, an @, a
        # secret's prefix): text without any is returned at once, and most ids
        # and labels are such text, so one C call replaces a redaction session
        # (~40 us).
        needs = [d.needs for d in detectors]
        self._needs = (
            None
            if any(need is None for need in needs)
            else regex.compile("|".join(f"(?:{need})" for need in needs), regex.VERSION1)
        )

    def scrub(self, text: str) -> str:
        """`text` with every value found replaced by its tag."""
        if not text or (self._needs is not None and self._needs.search(text) is None):
            return text
        return self.redactor.redact_all(text)[0]


#: For what callers see and what is stored: every built-in detector.
EVERYTHING = Scrubber(list(BUILTIN_DETECTORS))
#: For the server's own log lines: all but IPv4 addresses, which are what an
#: operator debugs with (peers, upstreams, bind addresses); secrets and personal
#: values still go.
FOR_LOGS = Scrubber([name for name in BUILTIN_DETECTORS if name != "ipv4"])


def scrub(text: str) -> str:
    """`text` with every value a built-in detector finds replaced by its tag."""
    return EVERYTHING.scrub(text)


def scrub_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A caller's labels as logs, spans and audit rows may keep them: keys and
    values are the caller's free text, so either can carry a value."""
    return {scrub(key): scrub(value) for key, value in labels.items()}


class ScrubbingFilter(logging.Filter):
    """Scrubs each record's message and traceback before any handler formats it.

    Structured fields (`extra`) are the server's own ids and counts and pass
    as they are; free text (messages, exception text) can quote anything."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = FOR_LOGS.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info:
            # Formatted here, once: both formatters print exc_text when exc_info is gone.
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = FOR_LOGS.scrub(text), None
        return True
