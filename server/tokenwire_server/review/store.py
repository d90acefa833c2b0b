"""Review stores: the interface, change notification, and the embedded SQLite default.

Reviews live where responses live: SQLite on one replica (a file, so pending
reviews survive a restart), Redis when replicas share responses
(redis_store.py). Every store keeps the one rule that makes a decision final:
`settle` moves a review out of PENDING only if it is still PENDING, so of two
decisions racing on one review (two reviewers, a reviewer and the expiry,
two replicas) exactly one takes effect.

`changes(review_id)` lets a watcher wait for the next change of a review
without polling; it must be entered before the review is read, so a change
between the read and the wait is never missed.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from tokenwire_server.review.model import Review, ReviewState

T = TypeVar("T")

#: Decided reviews are kept this long (30 days), then pruned; pending ones until they expire.
KEEP_DECIDED = 30 * 86_400.0


class Notifier:
    """In-process wake-ups for the watchers of a review."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def subscribe(self, review_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiting.setdefault(review_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiting.get(review_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[review_id]

    def notify(self, review_id: str) -> None:
        for event in self._waiting.get(review_id, ()):
            event.set()

    @property
    def watched(self) -> int:
        return len(self._waiting)


class ReviewStore(abc.ABC):
    #: How often a watcher re-reads a review it was not woken for: decisions made
    #: by another process (a rolling restart, another replica) may not wake it.
    poll_interval: float = 5.0

    def __init__(self) -> None:
        self.notifier = Notifier()

    @abc.abstractmethod
    async def create(self, review: Review) -> Review:
        """Stores a new PENDING review and returns it with its `seq`. A response
        has at most one review: when `review.response_id` has one already,
        that one is returned and nothing is written."""

    @abc.abstractmethod
    async def get(self, review_id: str) -> Review | None: ...

    @abc.abstractmethod
    async def page(
        self, tenant: str, state: ReviewState | None, after_seq: int, limit: int
    ) -> list[Review]:
        """The tenant's reviews with `seq` > `after_seq`, oldest first."""

    @abc.abstractmethod
    async def settle(self, review: Review) -> bool:
        """Stores `review` (decided or expired) only if the stored one is still
        PENDING; True when it took effect. Watchers are woken either way."""

    @abc.abstractmethod
    async def due(self, now: float, limit: int) -> list[str]:
        """Ids of PENDING reviews whose expiry time has come."""

    @abc.abstractmethod
    async def prune(self, decided_before: float) -> int:
        """Forgets reviews decided before that time; returns how many."""

    def changes(self, review_id: str) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set when `review_id` may have changed (see the module docstring)."""
        return self.notifier.subscribe(review_id)

    @abc.abstractmethod
    async def close(self) -> None: ...


_DDL = """
CREATE TABLE IF NOT EXISTS reviews (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    review_id TEXT NOT NULL UNIQUE,
    response_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    expires_at REAL NOT NULL,
    decided_at REAL NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reviews_by_tenant ON reviews (tenant, state, seq);
CREATE INDEX IF NOT EXISTS reviews_due ON reviews (state, expires_at);
"""
SCHEMA_VERSION = 1


class ReviewFileError(sqlite3.DatabaseError):
    """The file is not a review store this version can use."""


class SqliteReviewStore(ReviewStore):
    """Reviews in one SQLite file (`:memory:` keeps them in memory only), written
    by one dedicated thread so the event loop never blocks on it."""

    def __init__(self, path: str | Path, busy_timeout: float = 5.0) -> None:
        super().__init__()
        self.path = str(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-reviews")
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
            tables = {
                name
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if "reviews" in tables and version != SCHEMA_VERSION:
                raise ReviewFileError(f"review store layout {version}, this server knows 1")
            if "reviews" not in tables and tables - {"sqlite_sequence"}:
                raise ReviewFileError("the file is an SQLite database, but not a review store")
            connection.executescript(
                f"BEGIN IMMEDIATE;{_DDL}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;"
            )
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._connection is None:
                raise sqlite3.ProgrammingError("the review store is closed")
            return work(self._connection)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @staticmethod
    def _review(seq: int, body: str) -> Review:
        return replace(Review.from_json(body), seq=int(seq))

    async def create(self, review: Review) -> Review:
        def insert(connection: sqlite3.Connection) -> tuple[int, str]:
            connection.execute(
                "INSERT OR IGNORE INTO reviews "
                "(review_id, response_id, tenant, state, expires_at, body) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    review.review_id,
                    review.response_id,
                    review.tenant,
                    review.state.value,
                    review.expires_at,
                    review.to_json(),
                ),
            )
            row = connection.execute(
                "SELECT seq, body FROM reviews WHERE response_id = ?", (review.response_id,)
            ).fetchone()
            return int(row[0]), str(row[1])

        return self._review(*await self._run(insert))

    async def get(self, review_id: str) -> Review | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT seq, body FROM reviews WHERE review_id = ?", (review_id,)
            ).fetchone()
        )
        return None if row is None else self._review(*row)

    async def page(
        self, tenant: str, state: ReviewState | None, after_seq: int, limit: int
    ) -> list[Review]:
        args: tuple[str | int, ...]
        if state is None:
            query, args = (
                "SELECT seq, body FROM reviews WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?",
                (tenant, after_seq, limit),
            )
        else:
            query, args = (
                "SELECT seq, body FROM reviews WHERE tenant = ? AND state = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (tenant, state.value, after_seq, limit),
            )
        rows = await self._run(lambda c: c.execute(query, args).fetchall())
        return [self._review(*row) for row in rows]

    async def settle(self, review: Review) -> bool:
        decided_at = review.history[-1].at if review.history else 0.0

        def update(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE reviews SET state = ?, decided_at = ?, body = ? "
                "WHERE review_id = ? AND state = 'pending'",
                (review.state.value, decided_at, review.to_json(), review.review_id),
            )
            return cursor.rowcount == 1

        try:
            return await self._run(update)
        finally:
            self.notifier.notify(review.review_id)

    async def due(self, now: float, limit: int) -> list[str]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT review_id FROM reviews WHERE state = 'pending' AND expires_at <= ? "
                "ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [str(row[0]) for row in rows]

    async def prune(self, decided_before: float) -> int:
        return await self._run(
            lambda c: (
                c.execute(
                    "DELETE FROM reviews WHERE state != 'pending' AND decided_at < ?",
                    (decided_before,),
                ).rowcount
            )
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
