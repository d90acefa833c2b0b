"""Logs that help at 2 a.m.: every line a real `tokenwire serve` writes is
JSON, caller-caused noise (malformed requests, bad TLS clients, hang-ups) is a
bounded number of lines without tracebacks, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import run_serve, serve_env, start_serve_process, status_details, stream_request
from tests.test_tls import Pki
from tokenwire import tls_credentials
from tokenwire.v1 import respond_pb2_grpc

FLOOD = 200


async def start(*flags: str) -> tuple[asyncio.subprocess.Process, str]:
    """`tokenwire serve` as an operator starts it: no GRPC_VERBOSITY set."""
    return await start_serve_process(
        "--log-format", "json", *flags, env=serve_env(drop=("TOKENWIRE_", "GRPC_VERBOSITY"))
    )


async def test_every_line_is_json_and_caller_noise_stays_bounded(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    process, address = await start("--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
    try:
        async with grpc.aio.secure_channel(address, tls_credentials(pki.ca_pem)) as channel:
            malformed = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda body: body,
                response_deserializer=lambda body: body,
            )
            codes = set()
            for _ in range(FLOOD):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await malformed(b"\xff\xff\xff", timeout=10)
                codes.add(status_details(raised.value).error_info.reason)
            assert codes == {"MALFORMED_REQUEST"}

            stub = respond_pb2_grpc.RespondServiceStub(channel)
            slow = {"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "100"}
            for _ in range(5):
                call = stub.StreamRespond(stream_request(labels=slow))
                await call.read()
                call.cancel()

            # Clients the TLS port refuses: plaintext, and one trusting another CA.
            for credentials in (None, tls_credentials(pki.rogue_cert)):
                for _ in range(10):
                    bad = (
                        grpc.aio.insecure_channel(address)
                        if credentials is None
                        else grpc.aio.secure_channel(address, credentials)
                    )
                    async with bad:
                        with pytest.raises(grpc.aio.AioRpcError):
                            await health_pb2_grpc.HealthStub(bad).Check(
                                health_pb2.HealthCheckRequest(), timeout=2
                            )

            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    lines = err.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert all("Traceback" not in line for line in lines)
    malformed_lines = [r for r in records if "malformed request" in r["message"]]
    assert 1 <= len(malformed_lines) <= 3, malformed_lines
    assert all(r["level"] == "WARNING" for r in malformed_lines)
    assert not [r for r in records if r["level"] == "ERROR"], records
    cancels = [r for r in records if r.get("status") == "CANCELLED"]
    assert cancels and all(r["level"] == "INFO" for r in cancels)
    serving = next(r for r in records if r["message"].startswith("serving on"))
    assert "[IPV4]" not in serving["message"]  # an address is what an operator debugs with


def test_the_rate_limited_log_says_how_many_it_left_out() -> None:
    import logging

    from tokenwire_server.observability.rate_limited_log import RateLimitedLog

    now = [0.0]
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("test.rate_limited")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    limited = RateLimitedLog(logger, interval=10.0, clock=lambda: now[0])
    for _ in range(5):
        limited.log(logging.WARNING, "a", "event %s", "a")
    limited.log(logging.WARNING, "b", "event %s", "b")
    now[0] = 10.0
    limited.log(logging.WARNING, "a", "event %s", "a")
    assert seen == ["event a", "event b", "event a (4 more since the last such line)"]


async def test_a_port_in_use_is_one_line_without_grpc_core_output(tmp_path: Path) -> None:
    """grpc's core prints its own plain-text line for a failed bind; `serve`
    silences the core, so the operator reads one line and exit status 2."""
    holder, address = await start()
    try:
        port = address.rsplit(":", 1)[1]
        code, err = await run_serve(
            "--port", port, env=serve_env(drop=("TOKENWIRE_", "GRPC_VERBOSITY"))
        )
        lines = err.strip().splitlines()
        assert code == 2, lines
        assert len(lines) == 1 and lines[0].startswith("tokenwire serve: port:"), lines
    finally:
        holder.send_signal(signal.SIGTERM)
        await asyncio.wait_for(holder.communicate(), 60)


async def test_malformed_reflection_requests_are_one_line_each_kind(tmp_path: Path) -> None:
    """Reflection streams its requests, so grpc itself parses them and logs a
    failure as an ERROR with a traceback: that becomes one line per interval."""
    process, address = await start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reflect = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=lambda body: body,
                response_deserializer=lambda body: body,
            )
            for _ in range(50):
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in reflect(iter([b"\xff\xff\xff"]), timeout=10):
                        pass
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    lines = err.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert all("Traceback" not in line for line in lines)
    grpc_lines = [r for r in records if r["logger"].startswith("grpc")]
    assert 1 <= len(grpc_lines) <= 3, grpc_lines
