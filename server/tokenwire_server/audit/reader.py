"""Reading the audit trail (read-only): `tokenwire audit list` and `show`, and tests.

Rows come back as dicts of their columns, with `labels` and `actions` decoded
from JSON and `review_required` as a bool; `show` adds each row's token events.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenwire_server.audit import schema


@contextmanager
def open_read_only(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an audit file of the current layout; raises
    AuditFileError (a sqlite3.DatabaseError) for any other file."""
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"
    connection = sqlite3.connect(uri, uri=True)
    try:
        if not schema.check(connection):
            raise schema.AuditFileError("the file holds no audit trail")
        connection.row_factory = sqlite3.Row
        yield connection
    finally:
        connection.close()


def read_records(path: str | Path, limit: int = 20) -> list[dict[str, Any]]:
    """The newest rows first (every event is a row); used by `tokenwire audit list`."""
    with open_read_only(path) as connection:
        rows = connection.execute(
            "SELECT * FROM audit_events ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()
    return [_decode(dict(row)) for row in rows]


def read_history(path: str | Path, response_id: str) -> list[dict[str, Any]]:
    """Every row of one response, oldest first, each with its token events;
    used by `tokenwire audit show`."""
    with open_read_only(path) as connection:
        rows = connection.execute(
            "SELECT * FROM audit_events WHERE response_id = ? ORDER BY seq", (response_id,)
        ).fetchall()
        history = []
        for row in rows:
            record = _decode(dict(row))
            events = connection.execute(
                f"SELECT {', '.join(schema.TOKEN_COLUMNS)} FROM token_events "
                "WHERE event_seq = ? ORDER BY sequence",
                (record["seq"],),
            ).fetchall()
            record["token_events"] = [dict(e) for e in events]
            history.append(record)
    return history


def read_record(path: str | Path, response_id: str) -> dict[str, Any] | None:
    """The newest row of a response, with its token events (None when it has none)."""
    if not response_id:
        return None  # refusals share the empty id; they are no one response
    history = read_history(path, response_id)
    return history[-1] if history else None


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["labels"] = json.loads(row["labels"])
    row["actions"] = json.loads(row["actions"])
    row["review_required"] = bool(row["review_required"])
    return row
