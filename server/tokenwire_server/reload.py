"""Loading files at start and again on SIGHUP, each on its own.

Every file the server reads besides its configuration (the policy, the keys
file, the TLS material) loads through a `FileLoader`: at start a failure of
any kind becomes a `LoadError` whose message is one line naming the file and
the problem (the CLI prints it and exits 2); on reload a failure of any kind,
a loader's own error or a TypeError from a field of the wrong type alike, is
logged as one line and the previous version stays in force, while the other
files still reload. A file whose bytes have not changed since the version in
force was loaded is not loaded again ("unchanged").
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("tokenwire_server.reload")

T = TypeVar("T")

#: The `file` label values of the reload metrics, in reload order (keys
#: first: a revocation is the change that must never wait).
RELOAD_FILES = ("keys", "tls", "policy", "routing")


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    UNCHANGED = "unchanged"
    #: The config file changed, but what it sets is read at start only.
    RESTART_REQUIRED = "restart_required"


class FileProblem(ValueError):
    """A file's content is wrong, and the message already says where and how:
    the base of each loader's own error (PolicyError, KeysFileError, TlsError,
    ConfigError), so a message is shown as it is, while any other exception
    a loader raises keeps its type name in front."""


class LoadError(FileProblem):
    """A file could not be loaded; the message is one line naming it and the problem."""


def one_line(error: BaseException) -> str:
    """The loader's message; for an exception a loader did not mean to raise
    (TypeError, KeyError...), its type too. Never a traceback, never two lines."""
    text = str(error)
    if not isinstance(error, FileProblem):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return " ".join(text.split())


def problem(source: str, error: BaseException) -> str:
    """`source: problem`, without naming the source twice."""
    text = one_line(error)
    return text if not source or source in text else f"{source}: {text}"


def fingerprint(paths: Sequence[str]) -> bytes | None:
    """A digest of the files' bytes, or None when one cannot be read."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        except OSError:
            return None
    return digest.digest()


class FileLoader(Generic[T]):
    """Loads one kind of file (`kind`: policy, keys, tls), at start and on reload."""

    def __init__(self, kind: str, source: str, paths: Sequence[str], load: Callable[[], T]) -> None:
        self.kind = kind
        self.source = source
        self.paths = tuple(paths)
        self._load = load
        #: Digest of the files the version in force came from (None: unknown).
        self._fingerprint: bytes | None = None
        self.outcome = Outcome.UNCHANGED

    def first(self) -> T:
        """The load at start; any failure is a LoadError of one line."""
        try:
            return self._attempt()
        except Exception as error:
            raise LoadError(f"{self.kind} {problem(self.source, error)}") from None

    def next(self, keeping: str) -> T | None:
        """A reload: the new value, or None (unchanged, or failed and logged);
        `self.outcome` says which. `keeping` names the version in force."""
        before = fingerprint(self.paths)
        if before is not None and before == self._fingerprint:
            self.outcome = Outcome.UNCHANGED
            log.info("%s unchanged: %s", self.kind, self.source)
            return None
        try:
            value = self._attempt(before)
        except Exception as error:
            self.outcome = Outcome.FAILED
            log.error(
                "%s reload failed, keeping %s: %s",
                self.kind,
                keeping,
                problem(self.source, error),
            )
            return None
        self.outcome = Outcome.OK
        return value

    def forget(self) -> None:
        """What is in force no longer came from the files as they are (a failed
        keys reload narrowed it): the next reload loads them, whatever their bytes."""
        self._fingerprint = None

    def _attempt(self, before: bytes | None = None) -> T:
        if before is None:
            before = fingerprint(self.paths)
        value = self._load()
        # Only a file that did not change while it was read is known to be this version.
        self._fingerprint = before if before == fingerprint(self.paths) else None
        return value
