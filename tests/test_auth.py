"""Authentication and tenants through the real server: keys, mTLS identities, scoping."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import (
    StartServer,
    collect,
    completed_of,
    start_serve_process,
    status_details,
    stream_request,
)
from tests.test_tls import Pki
from tokenwire import AsyncClient, tls_credentials
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

KEY_A, KEY_B = "tw-key-acme-0123456789", "tw-key-globex-9876543210"


def keys_file(path: Path, *entries: tuple[str, str]) -> str:
    lines = ["keys:"] + [
        f"  - tenant: {tenant}\n    sha256: {hashlib.sha256(key.encode()).hexdigest()}"
        for tenant, key in entries
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def secured(start_server: StartServer, tmp_path: Path):
    path = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A), ("globex", KEY_B))
    return await start_server(auth_keys_file=path, audit_path=str(tmp_path / "audit.db"))


async def test_calls_need_a_valid_key(secured, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(secured.stub.StreamRespond(stream_request()))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.error_info.reason == "MISSING_CREDENTIALS"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(secured.stub.StreamRespond(stream_request(), metadata=bearer("wrong-key")))
    assert status_details(raised.value).error_info.reason == "INVALID_CREDENTIALS"
    assert "wrong-key" not in caplog.text
    completed = completed_of(
        await collect(secured.stub.StreamRespond(stream_request(), metadata=bearer(KEY_A)))
    )
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert secured.simulator.stats.started == 1
    assert KEY_A not in caplog.text


async def test_health_and_reflection_stay_open(secured) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_and_reflection_can_require_a_key_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A))
    server = await start_server(auth_keys_file=path, auth_health_and_reflection=True)
    health = health_pb2_grpc.HealthStub(server.channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert status_details(raised.value).error_info.reason == "MISSING_CREDENTIALS"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(health.Watch(health_pb2.HealthCheckRequest(service="")))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(reflection.ServerReflectionInfo(iter([list_services])))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    key = bearer(KEY_A)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), metadata=key)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=key)
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    replies = await collect(reflection.ServerReflectionInfo(iter([list_services]), metadata=key))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "tokenwire.v1.RespondService" in names


async def test_only_the_owning_tenant_can_resume_or_cancel(secured) -> None:
    request = stream_request(resumable=True, request_id="tenant-req")
    completed = completed_of(
        await collect(secured.stub.StreamRespond(request, metadata=bearer(KEY_A)))
    )
    resume = pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=completed.response_id, after_sequence=0)
    )
    replay = await collect(secured.stub.StreamRespond(resume, metadata=bearer(KEY_A)))
    assert completed_of(replay).final_sha256 == completed.final_sha256
    for call in (
        collect(secured.stub.StreamRespond(resume, metadata=bearer(KEY_B))),
        secured.stub.Cancel(
            pb.CancelRequest(response_id=completed.response_id), metadata=bearer(KEY_B)
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # The same request id from another tenant is a new response, not the first one.
    other = completed_of(await collect(secured.stub.StreamRespond(request, metadata=bearer(KEY_B))))
    assert other.response_id != completed.response_id


async def test_the_tenant_reaches_the_audit(secured, tmp_path: Path) -> None:
    from tokenwire_server.audit.store import read_record

    completed = completed_of(
        await collect(secured.stub.StreamRespond(stream_request(), metadata=bearer(KEY_B)))
    )
    record = read_record(tmp_path / "audit.db", completed.response_id)
    assert record is not None and record["tenant"] == "globex"


async def test_keys_reload_on_sighup_without_a_restart(tmp_path: Path) -> None:
    import signal

    path = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A))
    process, address = await start_serve_process("--auth-keys-file", path)
    try:
        assert process.stderr is not None
        async with grpc.aio.insecure_channel(address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            request = pb.RespondRequest(messages=stream_request().messages)
            await stub.Respond(request, metadata=bearer(KEY_A))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Respond(request, metadata=bearer(KEY_B))
            keys_file(Path(path), ("globex", KEY_B))
            process.send_signal(signal.SIGHUP)
            while b"keys reloaded" not in await asyncio.wait_for(process.stderr.readline(), 30):
                pass
            await stub.Respond(request, metadata=bearer(KEY_B))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Respond(request, metadata=bearer(KEY_A))
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_mtls_identity_is_the_tenant(start_server: StartServer, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server = await start_server(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_pem,
        auth_mtls=True,
        audit_path=str(tmp_path / "audit.db"),
    )
    credentials = tls_credentials(pki.ca_pem, pki.client_cert, pki.client_key)
    async with AsyncClient(server.address, credentials=credentials) as client:
        result = await client.stream("who am I", model="echo").collect()
    from tokenwire_server.audit.store import read_record

    record = read_record(tmp_path / "audit.db", result.completed.response_id)
    assert record is not None and record["tenant"] == "tenant-a.clients.tokenwire.dev"


async def test_client_and_cli_send_the_key(secured) -> None:
    async with AsyncClient(secured.address, api_key=KEY_A) as client:
        assert (await client.respond("hi", model="echo")).text == "hi"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "ask",
        "--target",
        secured.address,
        "--api-key",
        KEY_B,
        "--model",
        "echo",
        "keyed",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode() == "keyed\n"
    hashed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "keys",
        "hash",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await hashed.communicate(KEY_A.encode() + b"\n")
    assert out.decode().strip() == hashlib.sha256(KEY_A.encode()).hexdigest()


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("authorization", KEY_A),), "MALFORMED_CREDENTIALS"),  # a bare key
        ((("authorization", f"Basic {KEY_A}"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", f"Token {KEY_A}"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", "Bearer"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", "Bearer "),), "MALFORMED_CREDENTIALS"),
        ((("authorization", f"Bearer {KEY_A} {KEY_B}"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", f"Bearer{KEY_A}"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", ""),), "MALFORMED_CREDENTIALS"),  # an empty header
        ((("authorization", f"Bearer: {KEY_A}"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", f"Bearer Bearer {KEY_A}"),), "MALFORMED_CREDENTIALS"),
        # Two credentials folded into one header, as a proxy may join them.
        ((("authorization", f"Bearer {KEY_A}, Bearer {KEY_B}"),), "MALFORMED_CREDENTIALS"),
        (
            (("authorization", f"Bearer {KEY_A}"), ("authorization", "")),
            "DUPLICATE_CREDENTIALS",
        ),
        (
            (("authorization", f"Bearer {KEY_A}"), ("authorization", f"Bearer {KEY_B}")),
            "DUPLICATE_CREDENTIALS",
        ),
        (
            (("authorization", "Bearer wrong"), ("authorization", f"Bearer {KEY_A}")),
            "DUPLICATE_CREDENTIALS",
        ),
    ],
)
async def test_only_one_bearer_header_is_accepted(
    secured, metadata: tuple[tuple[str, str], ...], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for call in (
        lambda: collect(secured.stub.StreamRespond(stream_request(), metadata=metadata)),
        lambda: secured.stub.Respond(
            pb.RespondRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]),
            metadata=metadata,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call()
        details = status_details(raised.value)
        assert details.code == grpc.StatusCode.UNAUTHENTICATED
        assert details.error_info.reason == reason
        assert KEY_A not in (raised.value.details() or "") and KEY_A not in caplog.text
    assert secured.simulator.stats.started == 0


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {KEY_A}",
        f"bearer {KEY_A}",
        f"BEARER {KEY_A}",
        f"bEaReR {KEY_A}",
        f"Bearer  {KEY_A}",
    ],
)
async def test_the_bearer_scheme_is_case_insensitive(secured, header: str) -> None:
    """RFC 7235: the scheme is case-insensitive, then one or more spaces."""
    metadata = (("authorization", header),)
    completed = completed_of(
        await collect(secured.stub.StreamRespond(stream_request(), metadata=metadata))
    )
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_two_keys_are_refused_on_health_and_reflection_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A))
    server = await start_server(auth_keys_file=path, auth_health_and_reflection=True)
    health = health_pb2_grpc.HealthStub(server.channel)
    for metadata, reason in (
        ((*bearer(KEY_A), *bearer(KEY_A)), "DUPLICATE_CREDENTIALS"),
        ((("authorization", KEY_A),), "MALFORMED_CREDENTIALS"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
        details = status_details(raised.value)
        assert (details.code, details.error_info.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            reason,
        )
        assert KEY_A not in (raised.value.details() or "")
    answer = await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(KEY_A))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_key_is_compared_with_every_key_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No early exit: a valid key, the first key and an unknown one all cost one
    constant-time comparison per key in force, so timing says nothing about
    which key (or whether any) matched."""
    import hmac

    from tokenwire_server import auth

    keys = [(f"tenant{i}", f"tw-key-{i:04d}-abcdefghij") for i in range(5)]
    authenticator = auth.Authenticator(keys_file(tmp_path / "keys.yaml", *keys))
    compared: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(1)
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented, tenant in ((keys[0][1], "tenant0"), (keys[4][1], "tenant4"), ("nope", None)):
        compared.clear()
        assert authenticator.tenant_for(presented) == tenant
        assert len(compared) == len(keys), presented
