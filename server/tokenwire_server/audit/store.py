"""Audit stores: the interface and the embedded SQLite default.

Callers await `record` before the message it vouches for leaves: a
`Completed` is never sent before its row is committed (WAL, which survives a
process crash). A write that fails raises `AuditWriteError` and leaves no row
behind (its transaction is rolled back), so the chain stays intact and the
next write continues it. Rows are chained in the order they were submitted.

Where the write runs: on the event loop's own connection when nothing else
holds the file, because handing a row to a thread and back cost more CPU
(~230 us: two wake-ups and the GIL changing hands) than writing it (~75 us;
WAL with synchronous=NORMAL does not fsync on commit). That connection never
waits: its busy timeout is 0 and it never checkpoints (the one step that
fsyncs); a row that meets a lock, and every row after it until the thread
has caught up, goes to the dedicated writer thread, which waits for the lock
up to `busy_timeout` and runs the checkpoints. `record_soon` (a stream's
opening row) writes on the loop two iterations later, once the call has sent
its upstream request; the audit stage uses it only for a stream that runs
alone and hands the row to the thread otherwise.

Each write reads the chain's head inside its own `BEGIN IMMEDIATE`
transaction (one primary-key lookup) rather than trusting a copy in memory:
a restart continues the chain, and so does a second process writing the same
file (an old and a new server overlapping during a rolling restart).

Why one module: the loop's connection, the writer thread and the rows held
for later are one ordering; which of them writes a row depends on what the
others still hold.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
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

    def record_soon(self, record: AuditRecord) -> asyncio.Future[None]:
        """Appends the row a little later, before any row submitted after it
        (for a stream's opening row, written while the upstream produces its
        first token); the future tells whether it was committed."""
        return asyncio.wrap_future(self.record_nowait(record))

    @abc.abstractmethod
    async def close(self) -> None: ...


#: Rows the loop's connection commits between two checkpoints on the writer thread.
CHECKPOINT_EVERY = 512


class SqliteAuditStore(AuditStore):
    def __init__(self, path: str | Path, busy_timeout: float = 5.0) -> None:
        """`busy_timeout`: how long a write waits for another connection's lock
        (a backup, an operator's open transaction) before it fails."""
        self.path = str(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-audit")
        self._connection: sqlite3.Connection | None = None
        #: The event loop's own connection (never waits, never checkpoints); an
        #: in-memory database is one connection's alone, so it has none.
        self._loop_connection: sqlite3.Connection | None = None
        self._loop_thread: int | None = None
        #: Rows handed to the writer thread, and those it finished: while they
        #: differ, later rows follow them there, so the chain keeps the order of
        #: submission. Each counter has one writer (the loop, the thread): no race.
        self._submitted = 0
        self._finished = 0
        self._since_checkpoint = 0
        #: Rows `record_soon` holds for the loop, in order, with their futures.
        self._soon: list[tuple[AuditRecord, asyncio.Future[None]]] = []
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
            schema.guard(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _write_on_thread(self, record: AuditRecord) -> None:
        connection = self._connection
        if connection is None:
            raise AuditWriteError("the audit store is closed")
        _append(connection, record)

    def _checkpoint(self) -> None:
        if self._connection is not None:
            self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _on_loop(self) -> sqlite3.Connection | None:
        """The loop's connection, opened on first use in the loop's thread."""
        if self._loop_connection is None:
            if self.path == ":memory:" or self.path.startswith("file::memory:"):
                return None
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA wal_autocheckpoint=0")
            self._loop_connection, self._loop_thread = connection, threading.get_ident()
        elif self._loop_thread != threading.get_ident():
            return None  # another thread's loop: its rows go through the writer thread
        return self._loop_connection

    def _write_here(self, record: AuditRecord) -> bool:
        """Commits `record` on the loop's connection; False when it met a lock
        (nothing was written: the writer thread must wait for it instead)."""
        connection = self._on_loop()
        if connection is None:
            return False
        try:
            _append(connection, record)
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                return False
            raise
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            self._executor.submit(self._checkpoint).add_done_callback(_checked)
        return True

    def _submit(self, record: AuditRecord) -> Future[None]:
        future = self._executor.submit(self._write, record)
        self._submitted += 1
        return future

    def _write(self, record: AuditRecord) -> None:
        try:
            self._write_on_thread(record)
        finally:
            self._finished += 1

    def record_soon(self, record: AuditRecord) -> asyncio.Future[None]:
        """Written two loop iterations from now, after the current call has
        handed its request on (the generation task starts in between), so the
        write costs the loop time it would otherwise spend waiting, and no
        thread hand-off. A row recorded meanwhile writes these first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._soon.append((record, future))
        if len(self._soon) == 1:
            loop.call_soon(loop.call_soon, self._flush_soon)
        return future

    def _flush_soon(self) -> None:
        held, self._soon = self._soon, []
        for record, future in held:
            try:
                if self._written_here(record):
                    _settle(future, None)
                    continue
            except AuditWriteError as error:
                _settle(future, error)
                continue
            self.record_nowait(record).add_done_callback(functools.partial(_relay, future))

    def _written_here(self, record: AuditRecord) -> bool:
        """Commits `record` on the loop's connection when no row waits for the
        writer thread; False when the thread must write it (queued rows, a lock)."""
        if self._submitted != self._finished or self._closed:
            return False
        try:
            return self._write_here(record)
        except Exception as error:  # whatever broke, the row is not there
            log.error("audit write failed (%s event): %s", record.event, error)
            raise AuditWriteError("the audit row was not committed") from error

    async def record(self, record: AuditRecord) -> None:
        """A caller cancelled while it waits does not take the row back: the
        write is shielded, and committed (or logged as failed) all the same."""
        if self._soon:
            self._flush_soon()  # rows recorded earlier come first
        if self._written_here(record):
            return
        try:
            written = asyncio.wrap_future(self._submit(record))
            written.add_done_callback(_retrieved)
            await asyncio.shield(written)
        except Exception as error:  # whatever broke, the row is not there
            log.error("audit write failed (%s event): %s", record.event, error)
            raise AuditWriteError("the audit row was not committed") from error

    def record_nowait(self, record: AuditRecord) -> Future[None]:
        if self._soon:
            self._flush_soon()  # rows recorded earlier come first
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
        if self._soon:
            self._flush_soon()
        self._closed = True

        if self._loop_connection is not None:
            self._loop_connection.close()
            self._loop_connection = None

        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


def _append(connection: sqlite3.Connection, record: AuditRecord) -> None:
    """Appends one row in its own transaction, chained to the head it reads there."""
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
            connection.executemany(schema.INSERT_TOKEN, [(seq, *token_tuple(e)) for e in events])
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            # A failed COMMIT may have rolled back already.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # seen: its caller may be gone


def _relay(future: asyncio.Future[None], written: Future[None]) -> None:
    """The writer thread's outcome (logged by `record_nowait`), handed to the loop's future."""
    failed = written.cancelled() or written.exception() is not None
    outcome = AuditWriteError("the audit row was not committed") if failed else None
    future.get_loop().call_soon_threadsafe(_settle, future, outcome)


def _checked(future: Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("audit checkpoint failed: %s", future.exception())


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
