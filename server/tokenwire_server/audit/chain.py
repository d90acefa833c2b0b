"""The hash chain over the audit trail: how a row is hashed, and how a file is checked.

Each row stores `prev_sha256`, the `row_sha256` of the row before it (the
first row stores GENESIS), and its own `row_sha256`: SHA-256 of its canonical
form, the JSON (sorted keys, no spaces, ASCII) of every column but `seq` and
the hash itself. A row's token events are hashed into it (`token_events_sha256`)
so they are covered without being links of the chain.

Editing a column breaks that row's own hash; deleting, inserting or
reordering rows breaks a `prev_sha256` link; both are found by one pass in
`seq` order. A chain can be rewritten from the broken row onwards by someone
who knows the algorithm (it has no secret), and its newest rows can be cut
off: compare the head `verify` prints with one noted elsewhere
(`--expect-head`) to catch that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenwire_server.audit.records import AuditRecord, TokenEvent
from tokenwire_server.audit.schema import COERCE, HASHED_COLUMNS, ROW_COLUMNS, TOKEN_COLUMNS

_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord) if f.name != "token_events")
#: `prev_sha256` of the first row.
GENESIS = hashlib.sha256(b"tokenwire audit chain v1").hexdigest()
#: Problems listed before `verify` stops reading; the first one is what matters.
MAX_PROBLEMS = 20


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers."""
    hashed = {name: row[name] for name in HASHED_COLUMNS}
    return json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def row_hash(row: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


def token_events_hash(events: Iterable[Iterable[int]]) -> str:
    """SHA-256 over a row's token events in sequence order; "" when it has none."""
    rows = [list(e) for e in events]
    if not rows:
        return ""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def token_tuple(event: TokenEvent) -> tuple[int, ...]:
    return tuple(int(getattr(event, name)) for name in TOKEN_COLUMNS)


def stored_row(record: AuditRecord, recorded_at_ns: int) -> dict[str, Any]:
    """The row as SQLite will hand it back, before its chain columns are known."""
    values = {name: getattr(record, name) for name in _RECORD_FIELDS}
    values["labels"] = json.dumps(record.labels, sort_keys=True)
    values["actions"] = json.dumps(record.actions, sort_keys=True)
    values["recorded_at_ns"] = recorded_at_ns
    values["token_events_sha256"] = token_events_hash(
        token_tuple(e) for e in sorted(record.token_events, key=lambda e: e.sequence)
    )
    return {name: COERCE[name](values[name]) for name in HASHED_COLUMNS if name != "prev_sha256"}


def chained(row: dict[str, Any], prev_sha256: str) -> list[Any]:
    """The INSERT values of `row` linked after a row whose hash is `prev_sha256`."""
    row["prev_sha256"] = prev_sha256
    row["row_sha256"] = row_hash(row)
    return [row[name] for name in ROW_COLUMNS]


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong, and at which row (`seq`; 0 for the file as a whole)."""

    seq: int
    kind: str  # edited | missing | inserted | reordered | truncated | head
    message: str


@dataclass(slots=True)
class Report:
    rows: int = 0
    head_seq: int = 0
    head_sha256: str = GENESIS
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(connection: sqlite3.Connection, expect_head: str = "") -> Report:
    """Walks the chain in `seq` order; see the module docstring for what it proves."""
    report = Report()
    problems = report.problems
    expected_prev, prev_seq = GENESIS, 0
    #: Rows up to this seq belong to a reordering already reported.
    reordered_until = 0
    cursor = connection.execute(
        f"SELECT seq, {', '.join(ROW_COLUMNS)} FROM audit_events ORDER BY seq"
    )
    cursor.row_factory = sqlite3.Row
    for row in cursor:
        if len(problems) >= MAX_PROBLEMS:
            break
        seq = int(row["seq"])
        report.rows += 1
        stored = str(row["row_sha256"])
        own, tokens = _hashes(connection, row, seq)
        if own is None or tokens is None:
            problems.append(
                Problem(
                    seq,
                    "edited",
                    f"row {seq} was edited: a column holds a value no write stores (a BLOB)",
                )
            )
        elif own != stored:
            problems.append(
                Problem(
                    seq,
                    "edited",
                    f"row {seq} was edited: its columns no longer hash to its row_sha256",
                )
            )
        elif tokens != row["token_events_sha256"]:
            problems.append(
                Problem(seq, "edited", f"row {seq}: its token events were edited, deleted or added")
            )
        link, reordered_until = _link(
            connection, row, seq, prev_seq, expected_prev, reordered_until
        )
        if link is not None:
            problems.append(link)
        expected_prev, prev_seq = stored, seq
    report.head_seq, report.head_sha256 = prev_seq, expected_prev
    if len(problems) < MAX_PROBLEMS:
        problems.extend(_file_problems(connection, report, expect_head))
    return report


def _link(
    connection: sqlite3.Connection,
    row: sqlite3.Row,
    seq: int,
    prev_seq: int,
    expected_prev: str,
    reordered_until: int,
) -> tuple[Problem | None, int]:
    """The problem with the link from row `seq` back to row `prev_seq`, if any,
    and the last row of a reordering (whose later broken links are that one
    problem, not new ones)."""
    prev = str(row["prev_sha256"])
    gap = seq != prev_seq + 1
    missing = f"rows {prev_seq + 1}..{seq - 1}" if seq > prev_seq + 2 else f"row {prev_seq + 1}"
    if prev == expected_prev:
        if gap:  # an intact link over a hole: the rows around it were renumbered
            problem = Problem(
                prev_seq + 1, "missing", f"{missing} missing, and row {seq} was renumbered"
            )
            return problem, reordered_until
        return None, reordered_until
    if seq <= reordered_until:
        return None, reordered_until  # part of the reordering already reported
    target = _seq_of(connection, prev)
    before = "the start" if prev_seq == 0 else f"row {prev_seq}"
    if target is not None and target > seq:
        reordering = Problem(
            seq,
            "reordered",
            f"rows reordered between {before} and row {target}: row {seq} chains to row "
            f"{target}, which comes after it",
        )
        # Row `seq` came from right after row `target`; the row that followed it
        # there (target + 2 at most) links back into the moved rows.
        return reordering, target + 2
    if gap:
        gone = Problem(prev_seq + 1, "missing", f"{missing} missing (deleted) before row {seq}")
        return gone, reordered_until
    if target is not None and target < prev_seq:
        inserted = f"rows {target + 1}..{prev_seq}" if prev_seq > target + 1 else f"row {prev_seq}"
        insertion = Problem(
            prev_seq,
            "inserted",
            f"{inserted} inserted: row {seq} chains to row {target}, not to row {prev_seq}",
        )
        return insertion, reordered_until
    broken = Problem(
        seq,
        "missing",
        f"row {seq} does not chain to {before}: a row between them was deleted or "
        f"inserted, or {before} was edited and re-hashed",
    )
    return broken, reordered_until


def _hashes(
    connection: sqlite3.Connection, row: Mapping[str, Any], seq: int
) -> tuple[str | None, str | None]:
    """The row's own hash and its token events' hash; None for one that holds
    a value no write stores (a BLOB: not JSON), which only an edit can put there."""
    try:
        own: str | None = row_hash(row)
    except (TypeError, ValueError):
        own = None
    try:
        tokens: str | None = _token_hash(connection, seq)
    except (TypeError, ValueError):
        tokens = None
    return own, tokens


def _seq_of(connection: sqlite3.Connection, sha256: str) -> int | None:
    """The row whose hash is `sha256`; a full scan, run only for a broken link."""
    found = connection.execute(
        "SELECT seq FROM audit_events WHERE row_sha256 = ? ORDER BY seq LIMIT 1", (sha256,)
    ).fetchone()
    return None if found is None else int(found[0])


def _token_hash(connection: sqlite3.Connection, seq: int) -> str:
    return token_events_hash(
        connection.execute(
            f"SELECT {', '.join(TOKEN_COLUMNS)} FROM token_events WHERE event_seq = ? "
            "ORDER BY sequence",
            (seq,),
        )
    )


def _file_problems(
    connection: sqlite3.Connection, report: Report, expect_head: str
) -> list[Problem]:
    """What a walk of the rows cannot see: cut-off newest rows, stray token events."""
    found: list[Problem] = []
    high = connection.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'"
    ).fetchone()
    if high is not None and int(high[0]) > report.head_seq:
        last = int(high[0])
        cut = f"rows {report.head_seq + 1}..{last}" if last > report.head_seq + 1 else f"row {last}"
        found.append(Problem(last, "truncated", f"{cut} missing (deleted) after the last row"))
    stray = connection.execute(
        "SELECT DISTINCT event_seq FROM token_events WHERE event_seq NOT IN "
        "(SELECT seq FROM audit_events) ORDER BY event_seq LIMIT 1"
    ).fetchone()
    if stray is not None:
        found.append(
            Problem(int(stray[0]), "inserted", f"token events for row {stray[0]}, which is absent")
        )
    if expect_head and expect_head != report.head_sha256:
        at = _seq_of(connection, expect_head)
        if at is None:
            found.append(
                Problem(
                    0,
                    "head",
                    f"the expected head {expect_head[:16]}… is not in the chain: "
                    "rows were removed or rewritten",
                )
            )
    return found
