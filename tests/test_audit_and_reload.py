"""The audit trail (SQLite, CLI) and policy reload on SIGHUP, from outside the process."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import grpc
import pytest

from tests.conftest import (
    StartServer,
    chunks_of,
    collect,
    completed_of,
    start_serve_process,
    stream_request,
)
from tests.test_governance import POLICY_YAML, SECRETS, echo
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire_server.audit.store import read_record, read_records

KEY_ENV = {"TOKENWIRE_POLICY_HASH_KEY": "test-key-0123456789abcdef"}


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def audited(start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENWIRE_POLICY_HASH_KEY", KEY_ENV["TOKENWIRE_POLICY_HASH_KEY"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    audit_path = tmp_path / "audit.sqlite3"
    server = await start_server(policy=str(policy), audit_path=str(audit_path))
    return server, audit_path


async def test_every_response_is_recorded_before_completed_arrives(audited) -> None:
    server, audit_path = audited
    request = echo(f"mail {SECRETS['EMAIL']} now", 3, request_id="audit-1")
    request.labels["team"] = "payments"
    call = server.stub.StreamRespond(request)
    events = []
    async for event in call:
        if event.HasField("completed"):
            # The record is committed before Completed leaves the server.
            record = read_record(audit_path, event.completed.response_id)
            assert record is not None
        events.append(event)
    completed = completed_of(events)
    assert record["request_id"] == "audit-1"
    assert record["status"] == "OK"
    assert record["labels"]["team"] == "payments"
    assert record["labels"]["tokenwire.sim/echo-token-chars"] == "3"
    assert (record["model"], record["model_version"]) == ("echo", completed.model_version)
    assert (record["policy_id"], record["policy_version"]) == ("acme-test", "7")
    assert record["delivery_mode"] == "STREAM"
    assert record["chunk_count"] == completed.chunk_count == len(chunks_of(events))
    assert record["final_sha256"] == completed.final_sha256
    assert record["verdict"] == "REDACTED" and record["verification"] == "VERIFIED"
    assert record["finish_reason"] == "STOP"
    assert record["trace_id"] == completed.trace_id
    assert record["actions"] == [
        {
            "entity_type": "EMAIL",
            "operator": "REPLACE",
            "rule_id": "email",
            "start": a.start,
            "end": a.end,
        }
        for a in completed.actions
    ]
    assert record["total_ms"] > 0
    assert [e["sequence"] for e in record["token_events"]] == list(
        range(1, completed.chunk_count + 1)
    )
    # The raw value is stored nowhere in the audit file.
    raw = b"".join(p.read_bytes() for p in audit_path.parent.glob("audit.sqlite3*"))
    assert SECRETS["EMAIL"].encode() not in raw


async def test_failed_and_cancelled_calls_are_recorded(audited) -> None:
    server, audit_path = audited
    failing = stream_request(
        chunking=pb.Chunking(max_tokens_per_chunk=1), labels={"tokenwire.sim/fail-after": "3"}
    )
    received: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError):
        async for event in server.stub.StreamRespond(failing):
            received.append(event)
    slow = stream_request(
        labels={"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "500"}
    )
    call = server.stub.StreamRespond(slow)
    await call.read()
    call.cancel()
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
    await server.server.audit_store.close()  # flushes the writer thread
    rows = read_records(audit_path)
    # Each call has its own rows: the one that opened the stream, the one that ended it.
    assert sorted(r["event"] for r in rows) == ["accepted", "accepted", "cancelled", "failed"]
    ends = [r for r in rows if r["event"] != "accepted"]
    statuses = sorted((r["status"], r["error_reason"]) for r in ends)
    assert statuses == [("CANCELLED", ""), ("UNAVAILABLE", "BACKEND_FAILED")]
    failed = next(r for r in rows if r["status"] == "UNAVAILABLE")
    # Text the policy still held when the backend failed is never sent.
    assert failed["last_sequence"] == len(chunks_of(received))
    assert failed["completion_tokens"] == 3
    assert failed["prompt_tokens"] > 0


async def test_audit_cli_lists_and_shows_records(audited) -> None:
    server, audit_path = audited
    completed = completed_of(await collect(server.stub.StreamRespond(echo("EMP-000001 x", 4))))
    code, out, err = await run_cli("audit", "list", "--audit-path", str(audit_path))
    assert code == 0, err
    assert completed.response_id in out and "REDACTED" in out and "acme-test v7" in out
    code, out, _ = await run_cli(
        "audit", "show", completed.response_id, "--audit-path", str(audit_path), "--json"
    )
    assert code == 0
    shown = json.loads(out)["events"][-1]  # the whole history; the last row ended it
    assert shown["event"] == "completed"
    assert shown["actions"][0]["entity_type"] == "EMPLOYEE_ID"
    assert shown["actions"][0]["operator"] == "HASH"
    code, out, _ = await run_cli(
        "audit", "show", completed.response_id, "--audit-path", str(audit_path)
    )
    assert code == 0 and "HASH EMPLOYEE_ID" in out
    code, _, err = await run_cli("audit", "show", "rsp_missing", "--audit-path", str(audit_path))
    assert code == 1 and "no response rsp_missing" in err


async def test_sighup_reloads_the_policy_without_dropping_streams(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("id: live\nversion: '1'\nredact:\n  - detector: email\n")
    process, address = await start_serve_process(
        "--policy", str(policy), "--audit-path", str(tmp_path / "audit.sqlite3")
    )
    try:
        assert process.stderr is not None
        async with grpc.aio.insecure_channel(address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            old = stub.StreamRespond(
                stream_request(
                    labels={
                        "tokenwire.sim/inter-token-ms": "20",
                        "tokenwire.sim/answer-tokens": "60",
                    }
                )
            )
            first = await old.read()
            policy.write_text("id: live\nversion: '2'\nredact:\n  - detector: ipv4\n")
            process.send_signal(signal.SIGHUP)
            while b"policy reloaded: live v2" not in await asyncio.wait_for(
                process.stderr.readline(), 30
            ):
                pass
            fresh = completed_of(await collect(stub.StreamRespond(echo("a@b.io on 10.1.2.3", 3))))
            assert fresh.policy_version == "2" and fresh.final_text == "a@b.io on [IPV4]"
            events = [first]
            while (event := await old.read()) is not grpc.aio.EOF:
                events.append(event)
            completed = completed_of(events)
            assert completed.policy_version == "1"
            assert {c.governance.policy_version for c in chunks_of(events)} == {"1"}
            assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED

            policy.write_text("id: live\nversion: '3'\nredact:\n  - detector: nope\n")
            process.send_signal(signal.SIGHUP)
            while b"policy reload failed" not in await asyncio.wait_for(
                process.stderr.readline(), 30
            ):
                pass
            kept = completed_of(await collect(stub.StreamRespond(echo("10.1.2.3", 3))))
            assert kept.policy_version == "2"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
