"""The one idempotency rule (docs/operations.md, "Idempotency"), through the real surface.

A caller's request id (the `request_id` field, else the `x-request-id`
header) names one request per tenant: a retry with the same body attaches to
the response it started (same response id, replay from sequence 1, live
after), a different body is ALREADY_EXISTS `REQUEST_ID_REUSED`, and the
backend never runs twice, not even for first calls racing each other, on one
replica or on two sharing Redis.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import (
    RedisServer,
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    respond_request,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb

SLOW = {"tokenwire.sim/inter-token-ms": "5", "tokenwire.sim/answer-tokens": "40"}


def header(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


def stream(**fields: object) -> pb.StreamRespondRequest:
    fields.setdefault("labels", SLOW)
    return stream_request(chunking=pb.Chunking(max_tokens_per_chunk=1), **fields)


def shape(events: list[pb.StreamRespondResponse]) -> list[tuple[int, str, int]]:
    return [(c.sequence, c.text, c.text_offset) for c in chunks_of(events)]


def generations(*servers: RunningServer) -> int:
    return sum(s.simulator.stats.started for s in servers)


async def test_the_x_request_id_header_is_the_key_when_the_field_is_empty(
    server: RunningServer,
) -> None:
    first = await collect(server.stub.StreamRespond(stream(), metadata=header("hdr-1")))
    again = await collect(server.stub.StreamRespond(stream(), metadata=header("hdr-1")))
    assert completed_of(again).response_id == completed_of(first).response_id
    assert shape(again) == shape(first) and shape(again)[0][0] == 1  # replayed from 1
    unary = respond_request(labels=SLOW)
    one = await server.stub.Respond(unary, metadata=header("hdr-2"))
    two = await server.stub.Respond(unary, metadata=header("hdr-2"))
    assert one.completed.response_id == two.completed.response_id
    assert one.completed.final_sha256 == two.completed.final_sha256
    assert generations(server) == 2
    # Without an id of the caller's, every call generates.
    await collect(server.stub.StreamRespond(stream()))
    await collect(server.stub.StreamRespond(stream()))
    assert generations(server) == 4


async def test_the_field_takes_precedence_over_the_header(server: RunningServer) -> None:
    first = await collect(
        server.stub.StreamRespond(stream(request_id="field-1"), metadata=header("hdr-a"))
    )
    # Same field, another header: the field is the key, so this attaches.
    same = await collect(
        server.stub.StreamRespond(stream(request_id="field-1"), metadata=header("hdr-b"))
    )
    assert completed_of(same).response_id == completed_of(first).response_id
    # The first call's header was not its key: using it alone starts a new response.
    other = await collect(server.stub.StreamRespond(stream(), metadata=header("hdr-a")))
    assert completed_of(other).response_id != completed_of(first).response_id
    # The id is the id, wherever it travels: the header "field-1" names the same request.
    header_only = await collect(server.stub.StreamRespond(stream(), metadata=header("field-1")))
    assert completed_of(header_only).response_id == completed_of(first).response_id
    assert generations(server) == 2


async def test_racing_first_calls_generate_once(server: RunningServer) -> None:
    streams = await asyncio.gather(
        *(collect(server.stub.StreamRespond(stream(request_id="race-1"))) for _ in range(3)),
        *(
            collect(server.stub.StreamRespond(stream(), metadata=header("race-1")))
            for _ in range(3)
        ),
    )
    assert {completed_of(events).response_id for events in streams} == {
        completed_of(streams[0]).response_id
    }
    assert all(shape(events) == shape(streams[0]) for events in streams)
    unary = respond_request(request_id="race-2", labels=SLOW)
    replies = await asyncio.gather(*(server.stub.Respond(unary) for _ in range(5)))
    assert len({r.completed.response_id for r in replies}) == 1
    assert generations(server) == 2


async def test_a_retry_replays_from_sequence_one_then_follows_live(server: RunningServer) -> None:
    request = stream(
        request_id="live-1",
        resumable=True,
        labels={"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "40"},
    )
    first = server.stub.StreamRespond(request)
    held: list[pb.TokenChunk] = []
    async for event in first:
        if event.HasField("chunk"):
            held.append(event.chunk)
            if len(held) == 3:
                break
    # The first call still runs: the retry replays 1..3 and then gets the rest live.
    retry = await collect(server.stub.StreamRespond(request))
    completed = completed_of(retry)
    assert completed.response_id == held[0].response_id
    assert [c.sequence for c in chunks_of(retry)] == list(range(1, completed.last_sequence + 1))
    assert [(c.sequence, c.text) for c in chunks_of(retry)[:3]] == [
        (c.sequence, c.text) for c in held
    ]
    assert completed.usage.completion_tokens == 40
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert generations(server) == 1
    first.cancel()


async def test_the_same_id_with_another_body_is_already_exists(server: RunningServer) -> None:
    first = await collect(server.stub.StreamRespond(stream(), metadata=header("reuse-1")))
    for other, metadata in [
        (stream(params=pb.GenerationParams(seed=7)), header("reuse-1")),
        (stream(request_id="reuse-1", params=pb.GenerationParams(seed=7)), ()),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(server.stub.StreamRespond(other, metadata=metadata))
        details = status_details(raised.value)
        assert details.code == grpc.StatusCode.ALREADY_EXISTS
        assert details.error_info.reason == "REQUEST_ID_REUSED"
        assert details.error_info.metadata["requestId"] == "reuse-1"
        assert details.error_info.metadata["responseId"] == completed_of(first).response_id
    assert generations(server) == 1


async def test_one_id_names_one_request_whichever_rpc(server: RunningServer) -> None:
    reply = await server.stub.Respond(respond_request(request_id="rpc-1"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(stream_request(request_id="rpc-1")))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.ALREADY_EXISTS
    assert details.error_info.metadata["responseId"] == reply.completed.response_id
    assert generations(server) == 1


async def test_an_id_is_free_again_once_its_response_left_retention(
    start_server: StartServer,
) -> None:
    server = await start_server(retention=0.2)
    request = stream(request_id="short-1", resumable=True, labels={})
    first = completed_of(await collect(server.stub.StreamRespond(request))).response_id
    resume = pb.StreamRespondRequest(resume=pb.ResumeFrom(response_id=first))
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # poll until the response has expired
        try:
            await collect(server.stub.StreamRespond(resume))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        assert asyncio.get_running_loop().time() < deadline, "the response never expired"
        await asyncio.sleep(0.05)
    second = completed_of(await collect(server.stub.StreamRespond(request))).response_id
    assert second != first and generations(server) == 2


# ----- two replicas sharing Redis ------------------------------------------


async def two_replicas(
    start_server: StartServer, redis_server: RedisServer
) -> tuple[RunningServer, RunningServer]:
    a = await start_server(store=redis_server.url, lease_seconds=1)
    b = await start_server(store=redis_server.url, lease_seconds=1)
    return a, b


async def test_racing_first_calls_on_two_replicas_generate_once(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await two_replicas(start_server, redis_server)
    streams = await asyncio.gather(
        *(
            collect(replica.stub.StreamRespond(stream(), metadata=header("both-1")))
            for replica in (a, b, a, b)
        ),
    )
    assert len({completed_of(events).response_id for events in streams}) == 1
    assert all(shape(events) == shape(streams[0]) for events in streams)
    assert generations(a, b) == 1
    unary = respond_request(request_id="both-2", labels=SLOW)
    replies = await asyncio.gather(*(r.stub.Respond(unary) for r in (a, b, a, b)))
    assert len({r.completed.response_id for r in replies}) == 1
    assert len({r.completed.final_sha256 for r in replies}) == 1
    assert generations(a, b) == 2


async def test_a_different_body_on_another_replica_is_already_exists(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await two_replicas(start_server, redis_server)
    first = await collect(a.stub.StreamRespond(stream(), metadata=header("cross-1")))
    again = await collect(b.stub.StreamRespond(stream(), metadata=header("cross-1")))
    assert completed_of(again).response_id == completed_of(first).response_id
    assert shape(again) == shape(first)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(
            b.stub.StreamRespond(
                stream(params=pb.GenerationParams(seed=3)), metadata=header("cross-1")
            )
        )
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.ALREADY_EXISTS
    assert details.error_info.reason == "REQUEST_ID_REUSED"
    assert details.error_info.metadata["requestId"] == "cross-1"
    assert details.error_info.metadata["responseId"] == completed_of(first).response_id
    assert generations(a, b) == 1
