"""The audit file's layout: one append-only table of events, one of token events.

Every column has one declared SQLite type and every value is coerced to it
before it is hashed, so the hash computed at write time and the one computed
from the stored row by `tokenwire audit verify` see the same values (SQLite
would otherwise turn a Python int into a REAL in a REAL column, and the JSON of
`0` and `0.0` differ).
"""

from __future__ import annotations

import sqlite3

#: `PRAGMA user_version` of a hash-chained audit file.
SCHEMA_VERSION = 2

#: Event columns in table order, with their SQLite type; `seq`, the chain
#: columns and nothing else are added around them.
EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event", "TEXT"),
    ("response_id", "TEXT"),
    ("created_at_ns", "INTEGER"),
    ("recorded_at_ns", "INTEGER"),
    ("request_id", "TEXT"),
    ("trace_id", "TEXT"),
    ("tenant", "TEXT"),
    ("method", "TEXT"),
    ("status", "TEXT"),
    ("error_reason", "TEXT"),
    ("labels", "TEXT"),
    ("model", "TEXT"),
    ("model_version", "TEXT"),
    ("policy_id", "TEXT"),
    ("policy_version", "TEXT"),
    ("delivery_mode", "TEXT"),
    ("chunk_count", "INTEGER"),
    ("last_sequence", "INTEGER"),
    ("final_sha256", "TEXT"),
    ("verdict", "TEXT"),
    ("review_required", "INTEGER"),
    ("verification", "TEXT"),
    ("retract_from_sequence", "INTEGER"),
    ("actions", "TEXT"),
    ("finish_reason", "TEXT"),
    ("prompt_tokens", "INTEGER"),
    ("completion_tokens", "INTEGER"),
    ("time_to_first_token_ms", "REAL"),
    ("total_ms", "REAL"),
    ("resumed_after", "INTEGER"),
    ("token_events_sha256", "TEXT"),
    ("prev_sha256", "TEXT"),
)
#: The columns a row's hash covers: everything but `seq` (its place, which the
#: chain itself proves) and `row_sha256` (the hash).
HASHED_COLUMNS: tuple[str, ...] = tuple(name for name, _ in EVENT_COLUMNS)
ROW_COLUMNS: tuple[str, ...] = (*HASHED_COLUMNS, "row_sha256")

TOKEN_COLUMNS: tuple[str, ...] = (
    "sequence",
    "text_offset",
    "byte_length",
    "token_count",
    "action_count",
    "emitted_at_ns",
)

_DDL = f"""
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{name} {kind} NOT NULL" for name, kind in EVENT_COLUMNS)},
    row_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_response ON audit_events (response_id, seq);
CREATE TABLE IF NOT EXISTS token_events (
    event_seq INTEGER NOT NULL,
    {", ".join(f"{name} INTEGER NOT NULL" for name in TOKEN_COLUMNS)},
    PRIMARY KEY (event_seq, sequence)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""

#: Append-only for this server and anyone using the file by mistake; someone who
#: drops these triggers on purpose is what the hash chain is for. `INSERT OR
#: REPLACE` deletes the row it replaces without firing DELETE triggers (unless
#: the writer turned `recursive_triggers` on), so an insert onto an existing
#: key is refused before it runs.
_GUARDS = """
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_replace BEFORE INSERT ON audit_events
WHEN EXISTS (SELECT 1 FROM audit_events WHERE seq = NEW.seq)
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS token_events_no_update BEFORE UPDATE ON token_events
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS token_events_no_delete BEFORE DELETE ON token_events
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS token_events_no_replace BEFORE INSERT ON token_events
WHEN EXISTS (
    SELECT 1 FROM token_events WHERE event_seq = NEW.event_seq AND sequence = NEW.sequence
)
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""

INSERT_EVENT = (
    f"INSERT INTO audit_events ({', '.join(ROW_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(ROW_COLUMNS))})"
)
INSERT_TOKEN = (
    f"INSERT INTO token_events (event_seq, {', '.join(TOKEN_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(TOKEN_COLUMNS) + 1))})"
)

_COERCE = {"TEXT": str, "INTEGER": int, "REAL": float}
COERCE: dict[str, type] = {name: _COERCE[kind] for name, kind in EVENT_COLUMNS}


class AuditFileError(sqlite3.DatabaseError):
    """The file is not a hash-chained audit file this version can use. A
    `sqlite3.DatabaseError`, so the server's start-up check reports it as a
    problem with `audit_path` like any unreadable file."""


OLD_SCHEMA = (
    "the file has the old audit layout (one rewritable row per response, no hash "
    "chain) and is not migrated: its rows cannot be proved; move it aside (sqlite3 "
    "still reads it) and start a new file"
)


def check(connection: sqlite3.Connection) -> bool:
    """True when the file holds the current layout, False when it is empty;
    raises AuditFileError for anything else (the old layout, a newer one)."""
    tables = {
        name
        for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if "audit_events" in tables:
        if version != SCHEMA_VERSION:
            raise AuditFileError(f"audit layout version {version}, this server knows 2")
        return True
    if "responses" in tables:
        raise AuditFileError(OLD_SCHEMA)
    if tables - {"sqlite_sequence"}:
        raise AuditFileError("the file is an SQLite database, but not an audit trail")
    return False


def create(connection: sqlite3.Connection) -> None:
    """Creates the layout in an empty file, in one transaction; idempotent, so
    two processes opening the same new file at once both end up with it."""
    connection.executescript(f"BEGIN IMMEDIATE;{_DDL}{_GUARDS}COMMIT;")


def guard(connection: sqlite3.Connection) -> None:
    """Adds the append-only triggers a file made by an earlier version lacks
    (they are not hashed, so its chain is unchanged); idempotent."""
    connection.executescript(f"BEGIN IMMEDIATE;{_GUARDS}COMMIT;")
