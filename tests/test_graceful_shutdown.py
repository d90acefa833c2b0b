"""SIGTERM against a real `tokenwire serve` process: drain, then exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import (
    chunks_of,
    completed_of,
    start_serve_process,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

SLOW = {"tokenwire.sim/inter-token-ms": "25", "tokenwire.sim/answer-tokens": "40"}


@pytest.fixture
async def serve_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process, address = await start_serve_process("--grace-period", "5")
    yield process, address
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_sigterm_drains_in_flight_streams_then_exits_zero(
    serve_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, address = serve_process
    async with grpc.aio.insecure_channel(address) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="tokenwire.v1.RespondService"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        in_flight = stub.StreamRespond(stream_request(labels=SLOW))
        first = await in_flight.read()
        assert first.WhichOneof("event") in ("chunk", "heartbeat")

        process.send_signal(signal.SIGTERM)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING

        events = [first]
        while (event := await in_flight.read()) is not grpc.aio.EOF:
            events.append(event)
        completed = completed_of(events)
        assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
        assert completed.chunk_count == len(chunks_of(events))

        async with grpc.aio.insecure_channel(address) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_call(respond_pb2_grpc.RespondServiceStub(fresh))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    assert await asyncio.wait_for(process.wait(), timeout=30) == 0


async def pb_call(stub: respond_pb2_grpc.RespondServiceStub) -> pb.RespondResponse:
    return await stub.Respond(pb.RespondRequest(messages=stream_request().messages), timeout=5)


async def test_streams_longer_than_the_grace_period_are_cut_and_exit_is_zero() -> None:
    process, address = await start_serve_process("--grace-period", "0.3")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            long_stream = stub.StreamRespond(
                stream_request(
                    labels={
                        "tokenwire.sim/inter-token-ms": "50",
                        "tokenwire.sim/answer-tokens": "400",
                    }
                )
            )
            first = await long_stream.read()
            received = int(first.WhichOneof("event") == "chunk")
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                while (event := await long_stream.read()) is not grpc.aio.EOF:
                    received += event.WhichOneof("event") == "chunk"
            details = status_details(cut.value)
            assert details.code == grpc.StatusCode.CANCELLED
            assert details.error_info.reason == "RESPONSE_CANCELLED"
            trailers = dict(cut.value.trailing_metadata() or ())
            assert int(trailers["tokenwire-last-sequence"]) == received
            assert details.error_info.metadata["lastSequence"] == str(received)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
