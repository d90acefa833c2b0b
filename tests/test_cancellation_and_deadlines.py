"""Cancellation and deadlines stop generation, not only delivery."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import RunningServer, StartServer, collect, status_details, stream_request
from tokenwire.v1 import respond_pb2 as pb

SLOW = {"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "500"}


async def test_client_cancel_stops_the_backend_within_a_token_step(server: RunningServer) -> None:
    request = stream_request(chunking=pb.Chunking(max_tokens_per_chunk=1), labels=SLOW)
    call = server.stub.StreamRespond(request)
    received = 0
    async for event in call:
        if event.WhichOneof("event") == "chunk":
            received += 1
        if received == 3:
            call.cancel()
            break
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
    stats = server.simulator.stats
    assert stats.cancelled == 1 and stats.finished == 0
    # Generation stopped at once: at most the token in flight beyond what was sent.
    assert stats.tokens_emitted <= received + 2


async def test_client_deadline_mid_stream_stops_the_backend(server: RunningServer) -> None:
    call = server.stub.StreamRespond(stream_request(labels=SLOW), timeout=0.3)
    chunks = 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            chunks += event.WhichOneof("event") == "chunk"
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert chunks > 0
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
    assert server.simulator.stats.tokens_emitted < 50


async def test_unary_deadline_stops_the_backend(server: RunningServer) -> None:
    request = pb.RespondRequest(messages=stream_request().messages, labels=SLOW)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Respond(request, timeout=0.2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)


async def test_server_default_deadline_applies_without_a_client_deadline(
    start_server: StartServer,
) -> None:
    server = await start_server(default_deadline=0.3)
    call = server.stub.StreamRespond(
        stream_request(chunking=pb.Chunking(max_tokens_per_chunk=1), labels=SLOW)
    )
    chunks = 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            chunks += event.WhichOneof("event") == "chunk"
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details.error_info.reason == "DEADLINE_EXCEEDED"
    assert details.trailers["tokenwire-last-sequence"] == str(chunks)
    assert server.simulator.stats.cancelled == 1


async def test_max_deadline_caps_a_longer_client_deadline(start_server: StartServer) -> None:
    server = await start_server(default_deadline=0.2, max_deadline=0.3)
    call = server.stub.StreamRespond(stream_request(labels=SLOW), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(call)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_details(raised.value).error_info.reason == "DEADLINE_EXCEEDED"


async def test_cancelled_calls_leave_the_server_serving(server: RunningServer) -> None:
    calls = [server.stub.StreamRespond(stream_request(labels=SLOW)) for _ in range(5)]
    for call in calls:
        await call.read()
        call.cancel()
    response = await server.stub.Respond(pb.RespondRequest(messages=stream_request().messages))
    assert response.completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
