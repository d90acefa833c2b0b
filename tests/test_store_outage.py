"""A Redis outage degrades, never spreads (docs/operations.md, "When the shared store is down").

A real `redis-server` is killed and started again on the same port under
load: calls that need no shared store (non-resumable streams, unary calls
without a request id) keep succeeding throughout; calls that need it
(resumable streams, resumes, request ids) fail promptly with UNAVAILABLE
`STORE_UNAVAILABLE` and a RetryInfo that names nothing internal; once Redis
is back they work again, without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis

from tests.conftest import (
    RedisServer,
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    needs_redis,
    respond_request,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb

pytestmark = needs_redis

QUICK = {"tokenwire.sim/answer-tokens": "12"}
SLOW = {"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "80"}
STORE_LOGGER = "tokenwire_server.store.redis_store"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    """Polls `check` until it holds, within a bounded deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def resumable(**fields: object) -> pb.StreamRespondRequest:
    fields.setdefault("labels", QUICK)
    return stream_request(resumable=True, chunking=pb.Chunking(max_tokens_per_chunk=1), **fields)


def resume(response_id: str, after: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=response_id, after_sequence=after)
    )


def assert_store_unavailable(error: grpc.aio.AioRpcError, address: str) -> None:
    details = status_details(error)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "STORE_UNAVAILABLE"
    assert details.retry_info is not None and details.retry_info.retry_delay.ToNanoseconds() > 0
    host, port = address.removeprefix("redis://").split("/")[0].split(":")
    for leak in (host, port, "Error", "redis", "Connect"):
        assert leak not in details.message, details.message
        assert all(leak not in v for v in details.error_info.metadata.values())


async def refused_promptly(call: Awaitable[object], address: str) -> grpc.aio.AioRpcError:
    """The call fails with STORE_UNAVAILABLE well before its 30 s deadline."""
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert asyncio.get_running_loop().time() - started < 5
    assert_store_unavailable(raised.value, address)
    return raised.value


class Load:
    """Workers making calls that need no shared store, until stopped; any failure fails."""

    def __init__(self, server: RunningServer, workers: int = 4) -> None:
        self.done = 0
        self._server = server
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def _work(self) -> None:
        stub = self._server.stub
        while not self._stop.is_set():
            events = await collect(stub.StreamRespond(stream_request(labels=QUICK), timeout=30))
            assert completed_of(events).verification.status == pb.VERIFICATION_STATUS_VERIFIED
            reply = await stub.Respond(respond_request(labels=QUICK), timeout=30)
            assert reply.completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
            self.done += 2

    async def at_least(self, more: int) -> None:
        """Waits until `more` further calls succeeded (or a worker failed)."""
        target = self.done + more

        async def reached() -> bool:
            for task in self._tasks:
                if task.done():
                    task.result()  # raises what the worker hit
            return self.done >= target

        await eventually(reached)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_an_outage_fails_only_what_needs_the_store_and_recovers(
    start_server: StartServer, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOGGER)
    server = await start_server(store=redis_server.url, lease_seconds=1)
    stub, url = server.stub, redis_server.url
    finished = completed_of(await collect(stub.StreamRespond(resumable())))
    load = Load(server)
    await load.at_least(10)

    await redis_server.kill()
    await load.at_least(20)  # local calls go on while Redis is down
    await refused_promptly(collect(stub.StreamRespond(resumable(), timeout=30)), url)
    await refused_promptly(collect(stub.StreamRespond(resume("rsp_elsewhere", 0), timeout=30)), url)
    await refused_promptly(stub.Respond(respond_request(request_id="k-1"), timeout=30), url)
    await refused_promptly(
        collect(stub.StreamRespond(stream_request(), metadata=(("x-request-id", "k-2"),))), url
    )
    await refused_promptly(stub.Cancel(pb.CancelRequest(response_id="rsp_elsewhere")), url)
    # A response this replica generated and still holds replays from memory.
    replay = await collect(stub.StreamRespond(resume(finished.response_id, 0), timeout=30))
    assert completed_of(replay).final_sha256 == finished.final_sha256
    await load.at_least(20)

    await redis_server.start()  # the same port, empty: redis-py reconnects by itself

    async def resumable_works() -> bool:
        try:
            await collect(stub.StreamRespond(resumable(), timeout=30))
        except grpc.aio.AioRpcError as error:
            assert_store_unavailable(error, url)
            return False
        return True

    await eventually(resumable_works)
    reply = await stub.Respond(respond_request(request_id="k-1"), timeout=30)
    again = await stub.Respond(respond_request(request_id="k-1"), timeout=30)
    assert reply.completed.response_id == again.completed.response_id
    await load.at_least(10)
    await load.stop()

    warnings = [r for r in caplog.records if r.name == STORE_LOGGER and r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # rate-limited: once
    assert "STORE_UNAVAILABLE" in warnings[0].getMessage() and warnings[0].exc_info is None
    assert any("reachable again" in r.getMessage() for r in caplog.records)


async def test_local_calls_never_touch_redis(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    server = await start_server(store=redis_server.url)
    await collect(server.stub.StreamRespond(stream_request(labels=QUICK)))
    await server.stub.Respond(respond_request(labels=QUICK))
    client = redis.from_url(redis_server.url)
    try:
        assert await client.dbsize() == 0
        await collect(server.stub.StreamRespond(resumable()))
        assert await client.dbsize() > 0
    finally:
        await client.aclose()


async def test_losing_the_store_mid_stream_ends_it_with_the_last_sequence(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    server = await start_server(store=redis_server.url, lease_seconds=1)
    call = server.stub.StreamRespond(resumable(labels=SLOW), timeout=30)
    held: list[pb.TokenChunk] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            if event.HasField("chunk"):
                held.append(event.chunk)
                if len(held) == 5:
                    await redis_server.kill()
    assert_store_unavailable(raised.value, redis_server.url)
    details = status_details(raised.value)
    # Every chunk sent had been written first; the status names the last one.
    assert [c.sequence for c in held] == list(range(1, len(held) + 1))
    assert details.trailers["tokenwire-last-sequence"] == str(len(held))
    assert details.error_info.metadata["lastSequence"] == str(len(held))
    assert details.error_info.metadata["responseId"] == held[0].response_id

    # Generation stopped instead of running on unlogged.
    async def stopped() -> bool:
        return server.simulator.stats.cancelled == 1

    await eventually(stopped)

    # Redis comes back empty (no persistence): the response is gone, said plainly,
    # and new resumable calls work again.
    await redis_server.start()

    async def forgotten() -> bool:
        try:
            await collect(server.stub.StreamRespond(resume(held[0].response_id, len(held))))
        except grpc.aio.AioRpcError as error:
            if status_details(error).error_info.reason == "STORE_UNAVAILABLE":
                return False
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return True
        raise AssertionError("a response Redis forgot was resumed")

    await eventually(forgotten)
    events = await collect(server.stub.StreamRespond(resumable(), timeout=30))
    assert completed_of(events).verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_a_store_that_hangs_while_generation_finishes_still_says_store_unavailable(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """Redis stops answering (SIGSTOP) mid-stream and the answer finishes
    generating before the outage is noticed: the response is FINISHED, but
    its unwritten chunks cannot go out, so the stream ends UNAVAILABLE
    STORE_UNAVAILABLE with the last sequence, not INTERNAL."""
    server = await start_server(store=redis_server.url, lease_seconds=1)
    fast = {"tokenwire.sim/inter-token-ms": "2", "tokenwire.sim/answer-tokens": "60"}
    call = server.stub.StreamRespond(resumable(labels=fast), timeout=30)
    held: list[pb.TokenChunk] = []
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for event in call:
                if event.HasField("chunk"):
                    held.append(event.chunk)
                    if len(held) == 3:
                        redis_server.pause()
    finally:
        redis_server.unpause()
    assert_store_unavailable(raised.value, redis_server.url)
    details = status_details(raised.value)
    assert [c.sequence for c in held] == list(range(1, len(held) + 1))
    assert details.trailers["tokenwire-last-sequence"] == str(len(held))
    assert details.error_info.metadata["lastSequence"] == str(len(held))


async def test_a_mirror_cut_off_by_the_outage_ends_and_is_not_stuck(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(store=redis_server.url, lease_seconds=1)
    b = await start_server(store=redis_server.url, lease_seconds=1)
    call = a.stub.StreamRespond(resumable(labels=SLOW), timeout=30)
    held: list[pb.TokenChunk] = []
    async for event in call:
        if event.HasField("chunk"):
            held.append(event.chunk)
            if len(held) == 3:
                break
    response_id = held[0].response_id
    mirror = b.stub.StreamRespond(resume(response_id, 3), timeout=30)
    relayed: list[pb.TokenChunk] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in mirror:
            if event.HasField("chunk"):
                relayed.append(event.chunk)
                if len(relayed) == 2:
                    await redis_server.kill()
    assert_store_unavailable(raised.value, redis_server.url)
    sequences = [c.sequence for c in relayed]
    assert sequences == list(range(4, 4 + len(relayed)))
    assert status_details(raised.value).trailers["tokenwire-last-sequence"] == str(3 + len(relayed))
    call.cancel()

    await redis_server.start()

    async def b_serves_again() -> bool:
        try:
            events = await collect(b.stub.StreamRespond(resumable(), timeout=30))
        except grpc.aio.AioRpcError as error:
            assert_store_unavailable(error, redis_server.url)
            return False
        return bool(chunks_of(events))

    await eventually(b_serves_again)
    # B does not answer from a stale mirror: Redis forgot the response.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(b.stub.StreamRespond(resume(response_id, 0)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_after_an_outage_that_kept_the_data_the_stream_resumes_whole(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A partition, or a Redis with persistence: the log outlives the outage. The
    # response failed where it stood; resuming it afterwards continues it exactly.
    redis_server = RedisServer(tmp_path, persistent=True)
    await redis_server.start()
    try:
        server = await start_server(store=redis_server.url, lease_seconds=1)
        call = server.stub.StreamRespond(resumable(labels=SLOW), timeout=30)
        held: list[pb.TokenChunk] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for event in call:
                if event.HasField("chunk"):
                    held.append(event.chunk)
                    if len(held) == 5:
                        await redis_server.kill()
        assert_store_unavailable(raised.value, redis_server.url)
        await redis_server.start()

        rest: list[pb.StreamRespondResponse] = []

        async def resumed() -> bool:
            try:
                events = await collect(
                    server.stub.StreamRespond(resume(held[0].response_id, len(held)), timeout=30)
                )
            except grpc.aio.AioRpcError as error:
                assert_store_unavailable(error, redis_server.url)
                return False
            rest.extend(events)
            return True

        await eventually(resumed)
        chunks = held + chunks_of(rest)
        completed = completed_of(rest)
        assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
        offset = 0
        for chunk in chunks:
            assert chunk.text_offset == offset
            offset += len(chunk.text.encode())
        text = "".join(c.text for c in chunks)
        assert hashlib.sha256(text.encode()).hexdigest() == completed.final_sha256
        assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
        assert completed.usage.completion_tokens == 80
    finally:
        await redis_server.kill()
