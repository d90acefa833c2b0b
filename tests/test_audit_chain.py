"""The audit trail as evidence: append-only rows, a hash chain that `tokenwire audit
verify` checks, every call past auth recorded (refusals too), and fail-closed writes.

Everything goes through the real surface: an in-process server on port 0, real
gRPC calls, the real SQLite file (tampered with through sqlite3, as someone with
access to the file would), and the `tokenwire` command.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import (
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    make_config,
    respond_request,
    status_details,
    stream_request,
)
from tests.test_audit_and_reload import KEY_ENV, run_cli
from tests.test_auth import KEY_A, bearer, keys_file
from tests.test_governance import POLICY_YAML, echo
from tokenwire.cli import main as tokenwire_main
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire_server.audit.chain import GENESIS, row_hash
from tokenwire_server.audit.store import SqliteAuditStore, read_history, read_records
from tokenwire_server.server import TokenwireServer

SLOW = {"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "30"}


def tokenwire(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Runs the `tokenwire` command in-process: exit status, stdout, stderr."""
    code = tokenwire_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def raw_rows(path: Path) -> list[dict[str, Any]]:
    """The rows as stored (JSON columns undecoded), oldest first."""
    with sqlite3.connect(path) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM audit_events ORDER BY seq").fetchall()
    connection.close()
    return [dict(row) for row in rows]


def rows_of(path: Path) -> list[dict[str, Any]]:
    return list(reversed(read_records(path, limit=1000)))


@pytest.fixture
async def audited(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[RunningServer, Path]:
    """A server whose policy asks for token events, writing a real audit file."""
    monkeypatch.setenv("TOKENWIRE_POLICY_HASH_KEY", KEY_ENV["TOKENWIRE_POLICY_HASH_KEY"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    audit_path = tmp_path / "audit.sqlite3"
    server = await start_server(policy=str(policy), audit_path=str(audit_path))
    return server, audit_path


async def test_every_call_is_rows_of_its_own_events_and_the_chain_holds(
    audited: tuple[RunningServer, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server, path = audited
    unary = await server.stub.Respond(respond_request("hello", model="echo"))
    streamed = completed_of(await collect(server.stub.StreamRespond(echo("a b c", 2))))
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await server.stub.Respond(respond_request(model="no-such-model"))
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await collect(server.stub.StreamRespond(pb.StreamRespondRequest(resume=pb.ResumeFrom())))
    rows = rows_of(path)
    assert [(r["event"], r["status"]) for r in rows] == [
        ("completed", "OK"),
        ("accepted", ""),
        ("completed", "OK"),
        ("refused", "NOT_FOUND"),
        ("refused", "INVALID_ARGUMENT"),
    ]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["response_id"] == unary.completed.response_id
    assert rows[1]["response_id"] == rows[2]["response_id"] == streamed.response_id
    assert rows[2]["final_sha256"] == streamed.final_sha256
    assert len(read_history(path, streamed.response_id)[-1]["token_events"]) == (
        streamed.chunk_count
    )
    # A refusal names its status and reason; it belongs to no response.
    refused = rows[3]
    assert refused["response_id"] == "" and refused["method"] == "Respond"
    assert refused["error_reason"] == status_details(unknown.value).error_info.reason
    assert refused["model"] == "no-such-model"
    assert rows[4]["error_reason"] == status_details(invalid.value).error_info.reason
    # Each row links to the one before it, and hashes its stored columns.
    assert rows[0]["prev_sha256"] == GENESIS
    for before, after in itertools.pairwise(raw_rows(path)):
        assert after["prev_sha256"] == before["row_sha256"]
        assert after["row_sha256"] == row_hash(after)

    code, out, err = tokenwire(capsys, "audit", "verify", str(path))
    assert (code, err) == (0, "")
    assert out == f"intact: 5 rows, head row 5 sha256 {rows[-1]['row_sha256']}\n"
    code, out, _ = tokenwire(capsys, "audit", "verify", "--audit-path", str(path), "--json")
    assert code == 0 and json.loads(out)["intact"] is True
    # A restarted writer continues the chain from the file, not from GENESIS.
    await server.server.drain(grace=0)
    store = SqliteAuditStore(path)
    try:
        await store.record(_refusal_like(rows[3]))
    finally:
        await store.close()
    assert rows_of(path)[-1]["prev_sha256"] == rows[-1]["row_sha256"]
    assert tokenwire(capsys, "audit", "verify", str(path))[0] == 0


async def test_a_refusal_row_keeps_little_of_what_the_caller_sent(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Refused labels were never validated: bounded and scrubbed, so a refused call
    can neither fill the disk nor put a pasted secret in the trail."""
    path = tmp_path / "audit.sqlite3"
    server = await start_server(audit_path=str(path))
    labels = {f"k{n:02}": "v" * 5000 for n in range(40)}
    labels["k00"] = "mail jane.doe@example.com " + "x" * 5000
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.Respond(respond_request(labels=labels, model="x" * 10_000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (row,) = rows_of(path)
    assert row["event"] == "refused" and row["error_reason"]
    assert len(row["labels"]) == 8 and len(row["model"]) <= 128
    assert all(len(k) <= 64 and len(v) <= 128 for k, v in row["labels"].items())
    assert "jane.doe@example.com" not in json.dumps(row)


def _refusal_like(row: dict[str, Any]) -> Any:
    from tokenwire_server.audit.records import AuditRecord

    fields = {k: v for k, v in row.items() if k in AuditRecord.__dataclass_fields__}
    return AuditRecord(**{**fields, "token_events": ()})


async def test_a_quota_refusal_has_a_row_and_an_auth_failure_none(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "audit.sqlite3"
    keys = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A))
    server = await start_server(
        audit_path=str(path), auth_keys_file=keys, tenant_max_concurrent_calls=1
    )
    held = server.stub.StreamRespond(stream_request(labels=SLOW), metadata=bearer(KEY_A))
    await held.read()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(server.stub.StreamRespond(stream_request(), metadata=bearer(KEY_A)))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await server.stub.Respond(respond_request(), metadata=bearer("not-a-key"))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    held.cancel()
    rows = rows_of(path)
    quota = [r for r in rows if r["event"] == "refused"]
    assert [(r["status"], r["error_reason"], r["tenant"]) for r in quota] == [
        ("RESOURCE_EXHAUSTED", "TENANT_CONCURRENCY_EXCEEDED", "acme")
    ]
    # The unauthenticated call reached no audit; the held stream has its accepted row.
    assert [r["event"] for r in rows] == ["accepted", "refused"]


async def test_show_prints_a_resumed_response_s_whole_history(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.sqlite3"
    server = await start_server(audit_path=str(path))
    first = server.stub.StreamRespond(
        stream_request(labels=SLOW, resumable=True, chunking=pb.Chunking(max_tokens_per_chunk=1))
    )
    held = [await first.read() for _ in range(3)]
    response_id = held[0].chunk.response_id
    first.cancel()  # the connection drops; the response goes on
    resume = pb.ResumeFrom(response_id=response_id, after_sequence=3)
    resumed = completed_of(
        await collect(server.stub.StreamRespond(pb.StreamRespondRequest(resume=resume)))
    )
    # The second reader's completion does not overwrite the first reader's cancellation.
    await server.server.audit_store.close()  # flushes the cancelled call's row
    history = read_history(path, response_id)
    assert history[0]["event"] == "accepted" and history[0]["resumed_after"] == -1
    assert sorted(r["event"] for r in history) == ["accepted", "cancelled", "completed", "resumed"]
    completed = next(r for r in history if r["event"] == "completed")
    assert completed["resumed_after"] == 3
    assert completed["final_sha256"] == resumed.final_sha256
    assert [r["seq"] for r in history] == sorted(r["seq"] for r in history)

    code, out, err = tokenwire(
        capsys, "audit", "show", response_id, "--audit-path", str(path), "--json"
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["response_id"] == response_id
    assert [e["seq"] for e in shown["events"]] == [r["seq"] for r in history]
    code, out, _ = tokenwire(capsys, "audit", "show", response_id, "--audit-path", str(path))
    assert code == 0
    headings = [line for line in out.splitlines() if line.startswith("#")]
    assert [h.split()[1] for h in headings] == [r["event"] for r in history]
    assert any(" cancelled CANCELLED " in h for h in headings)
    code, _, err = tokenwire(capsys, "audit", "show", "rsp_missing", "--audit-path", str(path))
    assert code == 1 and "no response rsp_missing" in err


# --- tampering -----------------------------------------------------------------------


@pytest.fixture
async def trail(audited: tuple[RunningServer, Path]) -> Path:
    """A closed audit file of six rows: 1 unary completed, 2 accepted, 3 completed
    (with token events), 4 refused, 5 accepted, 6 completed."""
    server, path = audited
    await server.stub.Respond(respond_request("one", model="echo"))
    await collect(server.stub.StreamRespond(echo("two words", 3)))
    with pytest.raises(grpc.aio.AioRpcError):
        await server.stub.Respond(respond_request(model="no-such-model"))
    await collect(server.stub.StreamRespond(echo("three", 2)))
    await server.server.drain(grace=0)
    assert [r["event"] for r in rows_of(path)] == [
        "completed",
        "accepted",
        "completed",
        "refused",
        "accepted",
        "completed",
    ]
    return path


def unlocked(path: Path) -> sqlite3.Connection:
    """A connection to the file with the append-only triggers dropped, as a
    tamperer would; the hash chain is what has to catch them."""
    connection = sqlite3.connect(path, isolation_level=None)
    for table in ("audit_events", "token_events"):
        for guard in ("no_update", "no_delete", "no_replace"):
            connection.execute(f"DROP TRIGGER {table}_{guard}")
    return connection


def renumber(connection: sqlite3.Connection, old: int, new: int) -> None:
    connection.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (new, old))
    connection.execute("UPDATE token_events SET event_seq = ? WHERE event_seq = ?", (new, old))


def edit_a_column(connection: sqlite3.Connection) -> None:
    connection.execute("UPDATE audit_events SET status = 'OK' WHERE seq = 4")


def edit_a_token_event(connection: sqlite3.Connection) -> None:
    connection.execute("UPDATE token_events SET byte_length = 99 WHERE event_seq = 3")


def put_a_blob_in_a_column(connection: sqlite3.Connection) -> None:
    connection.execute("UPDATE audit_events SET tenant = X'616263' WHERE seq = 4")


def put_a_blob_in_a_token_event(connection: sqlite3.Connection) -> None:
    connection.execute("UPDATE token_events SET byte_length = X'01' WHERE event_seq = 3")


def delete_a_row(connection: sqlite3.Connection) -> None:
    connection.execute("DELETE FROM audit_events WHERE seq = 3")


def delete_the_last_row(connection: sqlite3.Connection) -> None:
    connection.execute("DELETE FROM audit_events WHERE seq = 6")


def swap_two_rows(connection: sqlite3.Connection) -> None:
    renumber(connection, 3, -1)
    renumber(connection, 4, 3)
    renumber(connection, -1, 4)


def insert_a_forged_row(connection: sqlite3.Connection) -> None:
    """A forger who knows the algorithm: the forged row hashes right and links to
    row 2; the rows after it move up one, token events included."""
    connection.row_factory = sqlite3.Row
    row = dict(connection.execute("SELECT * FROM audit_events WHERE seq = 2").fetchone())
    for seq in range(6, 2, -1):
        renumber(connection, seq, seq + 1)
    forged = {**row, "seq": 3, "event": "completed", "status": "OK"}
    forged["prev_sha256"] = row["row_sha256"]
    forged["row_sha256"] = row_hash(forged)
    columns = ", ".join(forged)
    connection.execute(
        f"INSERT INTO audit_events ({columns}) VALUES ({', '.join('?' * len(forged))})",
        list(forged.values()),
    )


TAMPERING = {
    "edited column": (edit_a_column, 4, "row 4 was edited"),
    "edited token event": (edit_a_token_event, 3, "row 3: its token events were edited"),
    "blob in a column": (put_a_blob_in_a_column, 4, "row 4 was edited: a column holds"),
    "blob in a token event": (put_a_blob_in_a_token_event, 3, "row 3 was edited: a column"),
    "deleted row": (delete_a_row, 3, "row 3 missing (deleted) before row 4"),
    "deleted last row": (delete_the_last_row, 6, "row 6 missing (deleted) after the last row"),
    "reordered rows": (
        swap_two_rows,
        3,
        "rows reordered between row 2 and row 4: row 3 chains to row 4",
    ),
    "inserted row": (
        insert_a_forged_row,
        3,
        "row 3 inserted: row 4 chains to row 2, not to row 3",
    ),
}


@pytest.mark.parametrize("case", TAMPERING)
async def test_verify_names_the_row_that_was_tampered_with(
    trail: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper, seq, message = TAMPERING[case]
    assert tokenwire(capsys, "audit", "verify", str(trail))[0] == 0
    connection = unlocked(trail)
    try:
        tamper(connection)
    finally:
        connection.close()
    code, out, err = tokenwire(capsys, "audit", "verify", str(trail))
    assert code == 1 and out == ""
    first = err.splitlines()[0]
    assert first.startswith(f"tokenwire audit verify: {message}"), err
    code, out, _ = tokenwire(capsys, "audit", "verify", str(trail), "--json")
    report = json.loads(out)
    assert code == 1 and report["intact"] is False
    assert report["problems"][0]["seq"] == seq


async def test_the_file_refuses_edits_and_verify_runs_as_a_command(trail: Path) -> None:
    """The triggers stop a casual edit; `tokenwire audit verify` is a real command."""
    with sqlite3.connect(trail) as connection, pytest.raises(sqlite3.IntegrityError):
        connection.execute("UPDATE audit_events SET status = 'OK'")
    with sqlite3.connect(trail) as connection, pytest.raises(sqlite3.IntegrityError):
        connection.execute("DELETE FROM audit_events")
    # INSERT OR REPLACE deletes the row it replaces without firing DELETE triggers.
    replacing = {
        "audit_events": "SELECT * FROM audit_events WHERE seq = 1",
        "token_events": "SELECT * FROM token_events LIMIT 1",
    }
    for table, existing in replacing.items():
        for verb in ("INSERT OR REPLACE", "REPLACE"):
            with sqlite3.connect(trail) as connection, pytest.raises(sqlite3.IntegrityError):
                connection.execute(f"{verb} INTO {table} {existing}")
    code, out, _ = await run_cli("audit", "verify", str(trail))
    assert code == 0 and out.startswith("intact: 6 rows")
    head = out.split()[-1]
    code, _, _ = await run_cli("audit", "verify", str(trail), "--expect-head", head)
    assert code == 0
    connection = unlocked(trail)
    delete_the_last_row(connection)
    connection.execute("DELETE FROM sqlite_sequence")  # hides the cut from the counter
    connection.close()
    code, _, err = await run_cli("audit", "verify", str(trail), "--expect-head", head)
    assert code == 1 and "the expected head" in err
    code, _, err = await run_cli("audit", "verify", str(trail.parent / "absent.sqlite3"))
    assert code == 2 and "no audit file" in err


async def test_a_file_from_before_the_replace_guards_gets_them_when_opened(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(trail) as connection:
        for table in ("audit_events", "token_events"):
            connection.execute(f"DROP TRIGGER {table}_no_replace")
    store = SqliteAuditStore(trail)
    await store.close()
    with sqlite3.connect(trail) as connection, pytest.raises(sqlite3.IntegrityError):
        connection.execute("REPLACE INTO audit_events SELECT * FROM audit_events WHERE seq = 2")
    connection.close()
    assert tokenwire(capsys, "audit", "verify", str(trail))[0] == 0


def test_an_old_layout_file_is_refused_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE responses (response_id TEXT PRIMARY KEY)")
    connection.close()
    with pytest.raises(sqlite3.DatabaseError, match="old audit layout"):
        SqliteAuditStore(path)
    code, _, err = tokenwire(capsys, "audit", "verify", str(path))
    assert code == 2 and "old audit layout" in err
    code, _, err = tokenwire(capsys, "audit", "list", "--audit-path", str(path))
    assert code == 1 and "old audit layout" in err


# --- fail closed ---------------------------------------------------------------------


@pytest.fixture
async def lockable(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, Path]]:
    """A server whose audit writes give up after 50 ms of waiting for a lock.

    The fault is real: another connection holding the file's write lock (an
    operator's sqlite3 shell left inside a transaction, a backup tool), so the
    server's own INSERT fails with "database is locked" exactly as it would in
    production, and releasing the lock is a real recovery. (Permissions would not
    do: the tests run as root.) The short timeout only keeps the test quick.
    """
    path = tmp_path / "audit.sqlite3"
    server = TokenwireServer(make_config(audit_path=str(path)))
    await server.audit_store.close()
    server.audit_store = SqliteAuditStore(path, busy_timeout=0.05)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    handle = RunningServer(
        server, f"127.0.0.1:{port}", channel, respond_pb2_grpc.RespondServiceStub(channel)
    )
    try:
        yield handle, path
    finally:
        await channel.close()
        await server.drain(grace=0)


def failures(server: RunningServer) -> float:
    value = server.server.metrics.registry.get_sample_value("tokenwire_audit_write_failures_total")
    return value or 0.0


async def test_an_unwritable_audit_fails_the_call_closed_and_recovers(
    lockable: tuple[RunningServer, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server, path = lockable
    streaming = server.stub.StreamRespond(stream_request(labels=SLOW))
    received = [await streaming.read()]  # its accepted row is committed
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        with pytest.raises(grpc.aio.AioRpcError) as stream_failed:
            while (event := await streaming.read()) is not grpc.aio.EOF:
                received.append(event)
        with pytest.raises(grpc.aio.AioRpcError) as unary_failed:
            await server.stub.Respond(respond_request())
        fresh: list[pb.StreamRespondResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as fresh_failed:
            async for event in server.stub.StreamRespond(stream_request()):
                fresh.append(event)
        for raised in (stream_failed, unary_failed, fresh_failed):
            details = status_details(raised.value)
            assert details.code == grpc.StatusCode.UNAVAILABLE
            assert details.error_info.reason == "AUDIT_UNAVAILABLE"
            assert str(path.parent) not in details.message and "locked" not in details.message
        # Nothing was released after the failed write: no Completed, no first chunk.
        assert chunks_of(received) and not any(e.HasField("completed") for e in received)
        assert fresh == []
        assert failures(server) == 3
        # A refusal keeps its own status (it releases nothing); the failure is counted.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await server.stub.Respond(respond_request(model="no-such-model"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert failures(server) == 4
        # The server goes on answering what needs no audit.
        health = health_pb2_grpc.HealthStub(server.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Writable again: calls complete and the chain is intact (failed writes left no row).
    completed = (await server.stub.Respond(respond_request())).completed
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert [r["event"] for r in rows_of(path)] == ["accepted", "completed"]
    assert tokenwire(capsys, "audit", "verify", str(path))[0] == 0
    assert failures(server) == 4


async def test_a_closed_store_fails_closed_too(start_server: StartServer, tmp_path: Path) -> None:
    """The store gone (closed under the server) is the same as a broken disk."""
    server = await start_server(audit_path=str(tmp_path / "audit.sqlite3"))
    await server.server.audit_store.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(server.stub.Respond(respond_request()), 10)
    assert status_details(raised.value).error_info.reason == "AUDIT_UNAVAILABLE"
    assert failures(server) == 1


def _bare_row(event: str, response_id: str) -> Any:
    from tokenwire_server.audit.records import AuditRecord

    return AuditRecord(
        event=event, response_id=response_id, request_id="req_1", trace_id="", tenant="",
        method="StreamRespond", status="OK", error_reason="", labels={}, model="echo",
        model_version="", policy_id="pass-through", policy_version="1", delivery_mode="",
        chunk_count=0, last_sequence=0, final_sha256="", verdict="", review_required=False,
        verification="", retract_from_sequence=0, actions=[], finish_reason="",
        prompt_tokens=0, completion_tokens=0, time_to_first_token_ms=0.0, total_ms=0.0,
        created_at_ns=1, token_events=(), resumed_after=-1,
    )  # fmt: skip


async def test_a_held_opening_row_goes_before_every_row_recorded_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`record_soon` holds a stream's opening row for two loop iterations; a row
    recorded meanwhile (on the loop, or handed to the writer thread) must not
    overtake it, and the chain still verifies."""
    path = tmp_path / "audit.sqlite3"
    store = SqliteAuditStore(path)
    try:
        opened = store.record_soon(_bare_row("accepted", "rsp_a"))
        await store.record(_bare_row("completed", "rsp_b"))
        later = store.record_soon(_bare_row("accepted", "rsp_c"))
        store.record_nowait(_bare_row("cancelled", "rsp_d")).result(timeout=10)
        await asyncio.gather(opened, later)
        alone = store.record_soon(_bare_row("accepted", "rsp_e"))
        await alone  # nothing else recorded: written by the loop, two iterations on
        await store.record(_bare_row("completed", "rsp_a"))
    finally:
        await store.close()
    rows = list(reversed(read_records(path)))
    assert [(r["event"], r["response_id"]) for r in rows] == [
        ("accepted", "rsp_a"),
        ("completed", "rsp_b"),
        ("accepted", "rsp_c"),
        ("cancelled", "rsp_d"),
        ("accepted", "rsp_e"),
        ("completed", "rsp_a"),
    ]
    assert tokenwire(capsys, "audit", "verify", str(path))[0] == 0


async def test_a_held_row_is_committed_by_close_and_refused_after_it(tmp_path: Path) -> None:
    from tokenwire_server.audit.store import AuditWriteError

    path = tmp_path / "audit.sqlite3"
    store = SqliteAuditStore(path)
    held = store.record_soon(_bare_row("accepted", "rsp_a"))
    await store.close()  # writes the held row before it closes
    await held
    assert [r["response_id"] for r in read_records(path)] == ["rsp_a"]
    with pytest.raises(AuditWriteError):
        await store.record_soon(_bare_row("accepted", "rsp_b"))


async def test_a_calls_labels_are_scrubbed_once_for_every_row_and_log_line(
    start_server: StartServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both audit rows of a stream and its log line carry the labels scrubbed,
    from one scrub per call (each costs ~5 us a label)."""
    from tokenwire_server.audit.reader import read_records
    from tokenwire_server.governance import scrub
    from tokenwire_server.interceptors import audit, observability
    from tokenwire_server.interceptors import call as call_module

    scrubbed: list[dict[str, str]] = []
    scrub_labels = scrub.scrub_labels

    def counted(labels: Any) -> dict[str, str]:
        scrubbed.append(dict(labels))
        return scrub_labels(labels)

    # Wherever the rows and the line could scrub labels, the same counter.
    for module in (scrub, call_module, audit, observability):
        monkeypatch.setattr(module, "scrub_labels", counted, raising=False)
    audit_path = tmp_path / "audit.sqlite3"
    server = await start_server(audit_path=str(audit_path))
    caplog.set_level("INFO", logger="tokenwire.responses")
    labels = {"team": "payments", "owner": "jane.doe@example.com"}
    completed = completed_of(
        await collect(server.stub.StreamRespond(stream_request(labels=labels)))
    )
    rows = [r for r in read_records(audit_path) if r["response_id"] == completed.response_id]
    assert sorted(r["event"] for r in rows) == ["accepted", "completed"]
    expected = scrub_labels(labels)
    assert expected["owner"] != labels["owner"] and expected["team"] == "payments"
    assert all(r["labels"] == expected for r in rows), rows
    lines = [r for r in caplog.records if getattr(r, "response_id", "") == completed.response_id]
    assert [getattr(r, "labels", None) for r in lines] == [expected]
    assert scrubbed == [labels]
