"""Audit stores: the interface and the embedded SQLite default.

SQLite runs on one dedicated thread (its connection never crosses threads),
so writing never blocks the event loop. Callers await `record` before the
terminal message leaves: a record of every completed response is committed
(WAL, which survives a process crash) before the caller can see the end.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenwire_server.audit.records import AuditRecord, TokenEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY,
    created_at_ns INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL,
    error_reason TEXT NOT NULL,
    labels TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    delivery_mode TEXT NOT NULL,
    chunk_count INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    final_sha256 TEXT NOT NULL,
    verdict TEXT NOT NULL,
    review_required INTEGER NOT NULL,
    verification TEXT NOT NULL,
    retract_from_sequence INTEGER NOT NULL,
    actions TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    time_to_first_token_ms REAL NOT NULL,
    total_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at_ns);
CREATE TABLE IF NOT EXISTS token_events (
    response_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    text_offset INTEGER NOT NULL,
    byte_length INTEGER NOT NULL,
    token_count INTEGER NOT NULL,
    action_count INTEGER NOT NULL,
    emitted_at_ns INTEGER NOT NULL,
    PRIMARY KEY (response_id, sequence)
);
"""

_COLUMNS = [f.name for f in dataclasses.fields(AuditRecord) if f.name != "token_events"]


class AuditStore(abc.ABC):
    @abc.abstractmethod
    async def record(self, record: AuditRecord) -> None:
        """Durably stores the record; returns once it is committed."""

    @abc.abstractmethod
    def record_nowait(self, record: AuditRecord) -> None:
        """Stores the record without waiting (for calls whose task is being cancelled)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class SqliteAuditStore(AuditStore):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-audit")
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SCHEMA)
        self._connection = connection

    def _write(self, record: AuditRecord) -> None:
        connection = self._connection
        assert connection is not None
        values: list[Any] = []
        for name in _COLUMNS:
            value = getattr(record, name)
            values.append(
                json.dumps(value, sort_keys=True) if name in ("labels", "actions") else value
            )
        with connection:
            connection.execute("BEGIN")
            connection.execute(
                f"INSERT OR REPLACE INTO responses ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                values,
            )
            if record.token_events:
                connection.executemany(
                    "INSERT OR REPLACE INTO token_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            record.response_id,
                            e.sequence,
                            e.text_offset,
                            e.byte_length,
                            e.token_count,
                            e.action_count,
                            e.emitted_at_ns,
                        )
                        for e in record.token_events
                    ],
                )

    async def record(self, record: AuditRecord) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, record)

    def record_nowait(self, record: AuditRecord) -> None:
        self._executor.submit(self._write, record)

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


def read_records(path: str | Path, limit: int = 20) -> list[dict[str, Any]]:
    """Newest first; used by `tokenwire audit list`."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT * FROM responses ORDER BY created_at_ns DESC LIMIT ?", (limit,)
        ).fetchall()
    return [_decode(dict(row)) for row in rows]


def read_record(path: str | Path, response_id: str) -> dict[str, Any] | None:
    """One record with its token events; used by `tokenwire audit show`."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        connection.row_factory = sqlite3.Row
        row = connection.execute(
            "SELECT * FROM responses WHERE response_id = ?", (response_id,)
        ).fetchone()
        if row is None:
            return None
        events = connection.execute(
            "SELECT sequence, text_offset, byte_length, token_count, action_count, emitted_at_ns "
            "FROM token_events WHERE response_id = ? ORDER BY sequence",
            (response_id,),
        ).fetchall()
    record = _decode(dict(row))
    record["token_events"] = [dict(e) for e in events]
    return record


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["labels"] = json.loads(row["labels"])
    row["actions"] = json.loads(row["actions"])
    row["review_required"] = bool(row["review_required"])
    return row


__all__ = ["AuditStore", "SqliteAuditStore", "TokenEvent", "read_record", "read_records"]
