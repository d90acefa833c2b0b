"""Audit stores: the interface and the embedded SQLite default.

SQLite runs on one dedicated thread (its connection never crosses threads),
so writing never blocks the event loop, and rows are chained in the order
they were submitted. Callers await `record` before the message it vouches for
leaves: a `Completed` is never sent before its row is committed (WAL, which
survives a process crash). A write that fails raises `AuditWriteError` and
leaves no row behind (its transaction is rolled back), so the chain stays
intact and the next write continues it.

Each write reads the chain's head inside its own `BEGIN IMMEDIATE`
transaction (one primary-key lookup) rather than trusting a copy in memory:
a restart continues the chain, and so does a second process writing the same
file (an old and a new server overlapping during a rolling restart).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tokenwire_server.audit import schema
from tokenwire_server.audit.chain import GENESIS, chained, stored_row, token_tuple
from tokenwire_server.audit.reader import read_history, read_record, read_records
from tokenwire_server.audit.records import AuditRecord, TokenEvent

log = logging.getLogger("tokenwire.audit")


class AuditWriteError(Exception):
    """A row could not be committed; the cause is logged, never shown to callers."""


class AuditStore(abc.ABC):
    @abc.abstractmethod
    async def record(self, record: AuditRecord) -> None:
        """Durably appends the row; returns once it is committed, raises
        AuditWriteError when it was not."""

    @abc.abstractmethod
    def record_nowait(self, record: AuditRecord) -> Future[None]:
        """Appends the row without waiting (for calls whose task is being
        cancelled); the future tells whether it was committed."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class SqliteAuditStore(AuditStore):
    def __init__(self, path: str | Path, busy_timeout: float = 5.0) -> None:
        """`busy_timeout`: how long a write waits for another connection's lock
        (a backup, an operator's open transaction) before it fails."""
        self.path = str(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-audit")
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _open(self) -> None:
        connection = sqlite3.connect(
            self.path, isolation_level=None, timeout=self._busy_timeout, check_same_thread=True
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            if not schema.check(connection):
                schema.create(connection)
                schema.check(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _write(self, record: AuditRecord) -> None:
        connection = self._connection
        if connection is None:
            raise AuditWriteError("the audit store is closed")
        row, events = stored_row(record, time.time_ns()), record.token_events
        connection.execute("BEGIN IMMEDIATE")
        try:
            head = connection.execute(
                "SELECT row_sha256 FROM audit_events ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            cursor = connection.execute(
                schema.INSERT_EVENT, chained(row, GENESIS if head is None else str(head[0]))
            )
            if events:
                seq = cursor.lastrowid
                connection.executemany(
                    schema.INSERT_TOKEN, [(seq, *token_tuple(e)) for e in events]
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                # A failed COMMIT may have rolled back already.
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise

    def _submit(self, record: AuditRecord) -> Future[None]:
        """Hashing and encoding happen on the writer thread too, off the event loop."""
        return self._executor.submit(self._write, record)

    async def record(self, record: AuditRecord) -> None:
        """A caller cancelled while it waits does not take the row back: the
        write is shielded, and committed (or logged as failed) all the same."""
        try:
            written = asyncio.wrap_future(self._submit(record))
            written.add_done_callback(_retrieved)
            await asyncio.shield(written)
        except Exception as error:  # whatever broke, the row is not there
            log.error("audit write failed (%s event): %s", record.event, error)
            raise AuditWriteError("the audit row was not committed") from error

    def record_nowait(self, record: AuditRecord) -> Future[None]:
        try:
            future = self._submit(record)
        except RuntimeError as error:  # the executor is shut down
            future = Future()
            future.set_exception(error)

        def logged(done: Future[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("audit write failed (%s event): %s", record.event, done.exception())

        future.add_done_callback(logged)
        return future

    async def close(self) -> None:
        """Waits for pending writes, then closes; safe to call twice."""
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


def _retrieved(future: asyncio.Future[None]) -> None:
    """Marks a shielded write's outcome as seen: its caller may be gone."""
    if not future.cancelled():
        future.exception()


__all__ = [
    "AuditStore",
    "AuditWriteError",
    "SqliteAuditStore",
    "TokenEvent",
    "read_history",
    "read_record",
    "read_records",
]
