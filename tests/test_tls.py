"""TLS and mTLS with certificates made at run time (trustme): what gets in, what does not."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import StartServer, completed_of, stream_request
from tokenwire import AsyncClient, Unavailable, tls_credentials
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc


class Pki:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert = self._write(
            "server.pem", b"".join(b.bytes() for b in server.cert_chain_pems)
        )
        self.server_key = self._write("server.key", server.private_key_pem.bytes())
        client = self.ca.issue_cert("tenant-a.clients.tokenwire.dev")
        self.client_cert = self._write("client.pem", client.cert_chain_pems[0].bytes())
        self.client_key = self._write("client.key", client.private_key_pem.bytes())
        rogue_ca = trustme.CA()
        rogue = rogue_ca.issue_cert("intruder.example")
        self.rogue_cert = self._write("rogue.pem", rogue.cert_chain_pems[0].bytes())
        self.rogue_key = self._write("rogue.key", rogue.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def ask(address: str, credentials: grpc.ChannelCredentials) -> pb.Completed:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        events = [e async for e in stub.StreamRespond(stream_request(model="echo"), timeout=10)]
    return completed_of(events)


async def test_tls_serves_and_refuses_plaintext(start_server: StartServer, pki: Pki) -> None:
    server = await start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    completed = await ask(server.address, tls_credentials(pki.ca_pem))
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Respond(pb.RespondRequest(messages=stream_request().messages), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_server_is_refused(
    start_server: StartServer, pki: Pki
) -> None:
    server = await start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    other = trustme.CA()
    other_ca = pki._write("other-ca.pem", other.cert_pem.bytes())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ask(server.address, tls_credentials(other_ca))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_lets_in_only_clients_the_ca_signed(start_server: StartServer, pki: Pki) -> None:
    server = await start_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_pem
    )
    good = tls_credentials(pki.ca_pem, pki.client_cert, pki.client_key)
    assert (await ask(server.address, good)).final_text
    for credentials in (
        tls_credentials(pki.ca_pem),  # no client certificate
        tls_credentials(pki.ca_pem, pki.rogue_cert, pki.rogue_key),  # another CA's
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await ask(server.address, credentials)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    async with AsyncClient(server.address, credentials=good) as client:
        result = await client.respond("over mTLS", model="echo")
    assert result.text == "over mTLS" and result.verified
    async with AsyncClient(server.address, credentials=tls_credentials(pki.ca_pem)) as client:
        with pytest.raises(Unavailable):
            await client.respond("no certificate", model="echo")


async def test_a_plaintext_health_port_answers_probes_of_an_mtls_server(
    start_server: StartServer, pki: Pki
) -> None:
    server = await start_server(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_pem,
        health_port=0,
    )
    assert server.server.health_port
    probe = f"127.0.0.1:{server.server.health_port}"
    async with grpc.aio.insecure_channel(probe) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tokenwire.v1.RespondService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # health only: nothing else
            await stub.Respond(pb.RespondRequest(messages=stream_request().messages), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        draining = asyncio.create_task(server.server.drain(grace=1))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await draining


async def test_ask_over_mtls(start_server: StartServer, pki: Pki) -> None:
    server = await start_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_pem
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "ask",
        "--target",
        server.address,
        "--model",
        "echo",
        "--tls-ca",
        pki.ca_pem,
        "--tls-cert",
        pki.client_cert,
        "--tls-key",
        pki.client_key,
        "secure hello",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert out.decode() == "secure hello\n"


def test_tls_settings_are_checked(pki: Pki) -> None:
    from tokenwire_server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="go together"):
        load_config({"tls_cert": pki.server_cert}, env={})
    with pytest.raises(ConfigError, match="no file"):
        load_config({"tls_cert": "/nonexistent.pem", "tls_key": pki.server_key}, env={})


async def tokenwire_ask(address: str, *flags: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenwire.cli", "ask", "--target", address, "--model", "echo"),
        *flags,
        "hello",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_ask_says_when_the_server_wants_a_client_certificate(
    start_server: StartServer, pki: Pki
) -> None:
    """gRPC itself only says "Socket closed": the server ended the handshake."""
    server = await start_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_pem
    )
    code, err = await tokenwire_ask(server.address, "--tls-ca", pki.ca_pem)
    assert code == 1
    first = err.splitlines()[0]
    assert first == (
        "tokenwire ask: the server refused the TLS handshake: it requires a client "
        "certificate (mTLS) and none was given; pass --tls-cert and --tls-key"
    )
    assert "Traceback" not in err
    code, err = await tokenwire_ask(
        server.address, "--tls-ca", pki.ca_pem, "--tls-cert", pki.rogue_cert, "--tls-key",
        pki.rogue_key,
    )  # fmt: skip
    assert code == 1
    assert f"it did not accept the client certificate {pki.rogue_cert}" in err.splitlines()[0]
    code, err = await tokenwire_ask(server.address)  # plaintext to a TLS port
    assert code == 1 and "does it expect TLS?" in err.splitlines()[0]


async def test_ask_names_a_missing_tls_file(pki: Pki) -> None:
    for flags, named in [
        (("--tls-ca", "/nonexistent/ca.pem"), "--tls-ca /nonexistent/ca.pem"),
        (("--tls-ca", pki.ca_pem, "--tls-cert", pki.client_cert, "--tls-key", "/gone.key"),
         "--tls-key /gone.key"),
    ]:  # fmt: skip
        code, err = await tokenwire_ask("127.0.0.1:1", *flags)
        assert code == 2
        assert err == f"tokenwire ask: {named}: no such file\n"
