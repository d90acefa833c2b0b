"""Several replicas sharing responses through a real Redis server.

The `redis_server` fixture (tests/conftest.py) starts Debian's `redis-server`
on a free loopback port (`.ci/run` installs it). Without it these tests skip
with that reason, and TOKENWIRE_REQUIRE_REDIS=1 (set by `.ci/run`) turns the
skip into a failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal

import grpc
import pytest

from tests.conftest import (
    RedisServer,
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    needs_redis,
    start_serve_process,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

pytestmark = needs_redis

SLOW = {"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "60"}


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


async def replicas(start_server: StartServer, url: str, **overrides: object):
    a = await start_server(store=url, lease_seconds=1, **overrides)
    b = await start_server(store=url, lease_seconds=1, **overrides)
    return a, b


def resumable(**fields: object) -> pb.StreamRespondRequest:
    fields.setdefault("labels", SLOW)
    return stream_request(resumable=True, chunking=pb.Chunking(max_tokens_per_chunk=1), **fields)


def resume(response_id: str, after: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=response_id, after_sequence=after)
    )


async def first_chunks(call, count: int) -> list[pb.TokenChunk]:
    held: list[pb.TokenChunk] = []
    async for event in call:
        if event.HasField("chunk"):
            held.append(event.chunk)
            if len(held) == count:
                return held
    return held


def assert_whole(held: list[pb.TokenChunk], events: list[pb.StreamRespondResponse]) -> None:
    chunks = held + chunks_of(events)
    completed = completed_of(events)
    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    offset = 0
    for chunk in chunks:
        assert chunk.text_offset == offset
        offset += len(chunk.text.encode())
    text = "".join(c.text for c in chunks)
    assert hashlib.sha256(text.encode()).hexdigest() == completed.final_sha256
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.last_sequence == len(chunks)


async def test_a_stream_resumes_live_on_another_replica(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await replicas(start_server, redis_url)
    call = a.stub.StreamRespond(resumable())
    held = await first_chunks(call, 5)
    call.cancel()  # the connection to replica A drops; A keeps generating
    events = await collect(b.stub.StreamRespond(resume(held[0].response_id, 5)))
    assert_whole(held, events)
    assert a.simulator.stats.started == 1 and a.simulator.stats.finished == 1
    assert b.simulator.stats.started == 0


@pytest.mark.parametrize("delay", [0, 0.0005])
async def test_a_finished_response_replays_on_another_replica(
    start_server: StartServer, redis_url: str, delay: float
) -> None:
    # At zero delay generation ends before the reader cuts a chunk: the log must
    # still hold every chunk before its ending.
    a, b = await replicas(start_server, redis_url, sim_inter_token_delay=delay)
    first = await collect(a.stub.StreamRespond(resumable(labels={})))
    replay = await collect(b.stub.StreamRespond(resume(completed_of(first).response_id, 0)))
    assert [(c.sequence, c.text, c.text_offset) for c in chunks_of(replay)] == [
        (c.sequence, c.text, c.text_offset) for c in chunks_of(first)
    ]
    assert completed_of(replay).final_sha256 == completed_of(first).final_sha256
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(b.stub.StreamRespond(resume("rsp_unknown", 0)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_ids_are_shared_between_replicas(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await replicas(start_server, redis_url)
    request = resumable(request_id="shared-1", labels={})
    first = await collect(a.stub.StreamRespond(request))
    second = await collect(b.stub.StreamRespond(request))
    assert completed_of(second).response_id == completed_of(first).response_id
    assert b.simulator.stats.started == 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(
            b.stub.StreamRespond(
                resumable(request_id="shared-1", labels={}, params=pb.GenerationParams(seed=4))
            )
        )
    assert status_details(raised.value).error_info.reason == "REQUEST_ID_REUSED"


async def test_cancel_on_one_replica_stops_generation_on_the_other(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await replicas(start_server, redis_url)
    call = a.stub.StreamRespond(resumable(labels={**SLOW, "tokenwire.sim/answer-tokens": "5000"}))
    held = await first_chunks(call, 3)
    cancelled = await b.stub.Cancel(pb.CancelRequest(response_id=held[0].response_id))
    assert cancelled.was_running
    await asyncio.wait_for(a.simulator.cancelled.wait(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.CANCELLED


async def test_a_killed_replica_is_taken_over_and_the_stream_continues(
    start_server: StartServer, redis_url: str
) -> None:
    process, address = await start_serve_process(
        "--store",
        redis_url,
        "--lease-seconds",
        "1",
        "--sim-time-to-first-token",
        "0",
        "--sim-inter-token-delay",
        "0.02",
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        b: RunningServer = await start_server(
            store=redis_url, lease_seconds=1, sim_inter_token_delay=0.02
        )
        async with grpc.aio.insecure_channel(address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            call = stub.StreamRespond(resumable(labels={"tokenwire.sim/answer-tokens": "120"}))
            held = await first_chunks(call, 5)
            process.send_signal(signal.SIGKILL)  # replica A dies mid-stream
            await process.wait()
        events = await collect(b.stub.StreamRespond(resume(held[0].response_id, 5), timeout=30))
        assert_whole(held, events)
        assert completed_of(events).usage.completion_tokens == 120
        # B regenerated the response (deterministically) to continue it.
        assert b.simulator.stats.started == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_reader_on_another_replica_keeps_the_owner_generating(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await replicas(start_server, redis_url, detach_window=0.5)
    call = a.stub.StreamRespond(resumable(labels={**SLOW, "tokenwire.sim/answer-tokens": "100"}))
    held = await first_chunks(call, 3)
    call.cancel()  # A has no reader left; B's reader must keep A going past 0.5 s
    events = await collect(b.stub.StreamRespond(resume(held[0].response_id, 3), timeout=30))
    assert_whole(held, events)
    assert a.simulator.stats.cancelled == 0


async def test_a_cancelled_buffered_response_stays_cancelled_everywhere(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await replicas(start_server, redis_url, heartbeat_interval=0.05)
    request = resumable(
        delivery_mode=pb.DELIVERY_MODE_BUFFERED,
        labels={**SLOW, "tokenwire.sim/answer-tokens": "500"},
    )
    call = a.stub.StreamRespond(request)
    heartbeat = await call.read()  # nothing else comes before the end in BUFFERED mode
    response_id = heartbeat.heartbeat.response_id
    assert response_id
    cancelled = await a.stub.Cancel(pb.CancelRequest(response_id=response_id))
    assert cancelled.was_running
    call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(b.stub.StreamRespond(resume(response_id, 0), timeout=10))
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert b.simulator.stats.started == 0


async def test_a_stopping_replica_ends_its_shared_streams_so_they_resume_elsewhere(
    start_server: StartServer, redis_url: str
) -> None:
    """Past the drain's grace, a stream of a response another replica can
    continue ends UNAVAILABLE / SERVER_STOPPING with its last sequence (in
    the trailers and the details), never grpc's bare cut; resumed on the
    other replica from there, the answer is whole."""
    a, b = await replicas(start_server, redis_url)
    call = a.stub.StreamRespond(resumable(), timeout=30)
    held = await first_chunks(call, 5)
    draining = asyncio.create_task(a.server.drain(grace=0.2))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            if event.HasField("chunk"):
                held.append(event.chunk)
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "SERVER_STOPPING"
    assert details.retry_info is not None
    assert details.trailers["tokenwire-last-sequence"] == str(len(held))
    assert details.error_info.metadata["lastSequence"] == str(len(held))
    assert details.error_info.metadata["responseId"] == held[0].response_id
    await draining
    events = await collect(b.stub.StreamRespond(resume(held[0].response_id, len(held))))
    assert_whole(held, events)
