"""Resume, replay, idempotent retries and Cancel, through the real gRPC surface."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest

from tests.conftest import (
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
from tokenwire_server.store.memory import InMemoryResponseStore

SLOW = {"tokenwire.sim/inter-token-ms": "10", "tokenwire.sim/answer-tokens": "60"}


def resumable(**fields: object) -> pb.StreamRespondRequest:
    fields.setdefault("labels", SLOW)
    return stream_request(resumable=True, chunking=pb.Chunking(max_tokens_per_chunk=1), **fields)


async def read_chunks(call, count: int) -> list[pb.TokenChunk]:
    chunks: list[pb.TokenChunk] = []
    async for event in call:
        if event.HasField("chunk"):
            chunks.append(event.chunk)
            if len(chunks) == count:
                break
    return chunks


def resume(response_id: str, after: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=response_id, after_sequence=after)
    )


async def test_a_dropped_stream_resumes_with_identical_chunks(server: RunningServer) -> None:
    first_call = server.stub.StreamRespond(resumable())
    first = await read_chunks(first_call, 5)
    first_call.cancel()  # the connection drops
    response_id = first[0].response_id

    events = await collect(server.stub.StreamRespond(resume(response_id, 5)))
    rest = chunks_of(events)
    completed = completed_of(events)
    chunks = first + rest
    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    offset = 0
    for chunk in chunks:
        assert chunk.text_offset == offset
        offset += len(chunk.text.encode())
    text = "".join(c.text for c in chunks)
    assert hashlib.sha256(text.encode()).hexdigest() == completed.final_sha256
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.chunk_count == completed.last_sequence == len(chunks)
    stats = server.simulator.stats
    assert (stats.started, stats.cancelled, stats.finished) == (1, 0, 1)

    # A finished response replays through the same Completed, chunk for chunk.
    replay = await collect(server.stub.StreamRespond(resume(response_id, 0)))
    assert [
        (c.sequence, c.text, c.text_offset, c.emitted_at.ToNanoseconds()) for c in chunks_of(replay)
    ] == [(c.sequence, c.text, c.text_offset, c.emitted_at.ToNanoseconds()) for c in chunks]
    again = completed_of(replay)
    assert again.final_sha256 == completed.final_sha256
    assert again.timing == completed.timing and again.response_id == response_id
    assert server.simulator.stats.started == 1


async def test_resume_after_the_last_sequence_is_out_of_range(server: RunningServer) -> None:
    completed = completed_of(await collect(server.stub.StreamRespond(resumable(labels={}))))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(resume(completed.response_id, 999)))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.OUT_OF_RANGE
    assert details.error_info.reason == "SEQUENCE_OUT_OF_RANGE"
    assert details.error_info.metadata["lastSequence"] == str(completed.last_sequence)
    # Resuming exactly at the end replays only the Completed.
    tail = await collect(
        server.stub.StreamRespond(resume(completed.response_id, completed.last_sequence))
    )
    assert [e.WhichOneof("event") for e in tail] == ["completed"]


async def test_an_unresumed_response_stops_when_the_detach_window_closes(
    start_server: StartServer,
) -> None:
    server = await start_server(detach_window=0.2)
    call = server.stub.StreamRespond(
        resumable(labels={**SLOW, "tokenwire.sim/answer-tokens": "5000"})
    )
    held = await read_chunks(call, 3)
    call.cancel()
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
    # What was generated while detached is in the log; resuming replays it and then
    # reports the cancellation with the last sequence.
    received: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in server.stub.StreamRespond(resume(held[0].response_id, 3)):
            received.append(event)
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.CANCELLED
    assert details.error_info.reason == "RESPONSE_CANCELLED"
    assert int(details.trailers["tokenwire-last-sequence"]) == 3 + len(chunks_of(received))
    assert len(chunks_of(received)) >= 1


async def test_resumable_by_default(start_server: StartServer) -> None:
    server = await start_server(resumable_by_default=True)
    request = stream_request(labels=SLOW, chunking=pb.Chunking(max_tokens_per_chunk=1))
    call = server.stub.StreamRespond(request)
    held = await read_chunks(call, 2)
    call.cancel()
    completed = completed_of(
        await collect(server.stub.StreamRespond(resume(held[0].response_id, 2)))
    )
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert server.simulator.stats.cancelled == 0


async def test_a_dropped_buffered_response_is_still_one_chunk(server: RunningServer) -> None:
    request = resumable(delivery_mode=pb.DELIVERY_MODE_BUFFERED, request_id="buffered-1")
    call = server.stub.StreamRespond(request)
    await call.initial_metadata()
    call.cancel()  # dropped before anything was sent
    events = await collect(server.stub.StreamRespond(request))  # the retry attaches
    completed = completed_of(events)
    assert len(chunks_of(events)) == 1 == completed.chunk_count
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    replay = await collect(server.stub.StreamRespond(resume(completed.response_id, 0)))
    assert [c.text for c in chunks_of(replay)] == [completed.final_text]
    assert server.simulator.stats.started == 1


async def test_cancel_stops_a_response_and_its_readers_see_why(server: RunningServer) -> None:
    call = server.stub.StreamRespond(
        resumable(labels={**SLOW, "tokenwire.sim/answer-tokens": "5000"})
    )
    held = await read_chunks(call, 3)
    response_id = held[0].response_id
    cancelled = await server.stub.Cancel(pb.CancelRequest(response_id=response_id))
    assert cancelled.response_id == response_id and cancelled.was_running
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.CANCELLED
    assert details.error_info.reason == "RESPONSE_CANCELLED"
    assert int(details.trailers["tokenwire-last-sequence"]) >= 3
    assert server.simulator.stats.cancelled == 1

    again = await server.stub.Cancel(pb.CancelRequest(response_id=response_id))
    assert not again.was_running and again.last_sequence == cancelled.last_sequence
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Cancel(pb.CancelRequest(response_id="rsp_unknown"))
    assert status_details(raised.value).code == grpc.StatusCode.NOT_FOUND


async def test_cancel_racing_completion_is_one_ending(server: RunningServer) -> None:
    completed = completed_of(await collect(server.stub.StreamRespond(resumable(labels={}))))
    results = await asyncio.gather(
        *(server.stub.Cancel(pb.CancelRequest(response_id=completed.response_id)) for _ in range(5))
    )
    assert not any(r.was_running for r in results)
    replay = completed_of(
        await collect(server.stub.StreamRespond(resume(completed.response_id, 0)))
    )
    assert replay.final_sha256 == completed.final_sha256


async def test_a_retried_request_id_attaches_instead_of_generating_again(
    server: RunningServer,
) -> None:
    request = resumable(request_id="retry-7")
    first, second = await asyncio.gather(
        collect(server.stub.StreamRespond(request)), collect(server.stub.StreamRespond(request))
    )
    assert server.simulator.stats.started == 1
    assert [c.text for c in chunks_of(first)] == [c.text for c in chunks_of(second)]
    assert completed_of(first).response_id == completed_of(second).response_id
    third = await collect(server.stub.StreamRespond(request))
    assert completed_of(third).final_sha256 == completed_of(first).final_sha256
    assert server.simulator.stats.started == 1


async def test_a_retried_unary_request_id_attaches_too(server: RunningServer) -> None:
    request = respond_request(request_id="unary-9", labels={"tokenwire.sim/inter-token-ms": "2"})
    first, second = await asyncio.gather(server.stub.Respond(request), server.stub.Respond(request))
    assert first.completed.final_text == second.completed.final_text
    assert first.completed.response_id == second.completed.response_id
    assert server.simulator.stats.started == 1


async def test_a_reused_request_id_with_another_body_is_already_exists(
    server: RunningServer,
) -> None:
    await collect(server.stub.StreamRespond(resumable(request_id="same-id", labels={})))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(
            server.stub.StreamRespond(
                resumable(request_id="same-id", labels={}, params=pb.GenerationParams(seed=9))
            )
        )
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.ALREADY_EXISTS
    assert details.error_info.reason == "REQUEST_ID_REUSED"
    assert details.error_info.metadata["responseId"].startswith("rsp_")


async def test_the_store_stays_within_its_bounds_under_10000_responses(
    start_server: StartServer,
) -> None:
    server = await start_server(store_max_responses=500, store_max_bytes=40_000)
    store = server.server.store
    assert isinstance(store, InMemoryResponseStore)
    request = respond_request(labels={"tokenwire.sim/answer-tokens": "8"})
    for _ in range(100):
        await asyncio.gather(*(server.stub.Respond(request) for _ in range(100)))
        assert len(store) <= 500 + 100  # ended ones bounded; at most a batch still running
        assert store.retained_bytes <= 40_000
    assert server.simulator.stats.finished == 10_000


@pytest.fixture
async def proxy(server: RunningServer):
    from tests.tcp_proxy import CuttableProxy

    host, port = server.address.rsplit(":", 1)
    cuttable = CuttableProxy(host, int(port))
    address = await cuttable.start()
    yield cuttable, address
    await cuttable.close()


async def test_the_client_resumes_across_a_cut_connection(server: RunningServer, proxy) -> None:
    from tokenwire import AsyncClient, Chunk

    cuttable, address = proxy
    async with AsyncClient(address) as client:
        stream = client.stream(
            "x", mode="stream", resumable=True, max_tokens_per_chunk=1, labels=SLOW
        )
        sequences = []
        async for event in stream:
            if isinstance(event, Chunk):
                sequences.append(event.sequence)
                if len(sequences) == 5:
                    cuttable.cut()
    result = stream.result
    assert result is not None and result.verified
    assert stream.resumes >= 1 and cuttable.connections >= 2
    assert sequences == list(range(1, len(sequences) + 1))
    assert len(sequences) == result.completed.chunk_count
    assert server.simulator.stats.started == 1 and server.simulator.stats.cancelled == 0


async def test_the_sync_client_resumes_too(server: RunningServer, proxy) -> None:
    from tokenwire import Chunk, Client

    cuttable, address = proxy
    loop = asyncio.get_running_loop()

    def run() -> tuple[int, bool, int]:
        with Client(address) as client:
            stream = client.stream(
                "x", mode="stream", resumable=True, max_tokens_per_chunk=1, labels=SLOW
            )
            count = 0
            for event in stream:
                if isinstance(event, Chunk):
                    count += 1
                    if count == 4:
                        loop.call_soon_threadsafe(cuttable.cut)
            assert stream.result is not None
            return count, stream.result.verified, stream.resumes

    count, verified, resumes = await asyncio.to_thread(run)
    assert verified and resumes >= 1 and count == 60


async def test_without_resumable_a_cut_connection_is_an_error(server: RunningServer, proxy) -> None:
    from tokenwire import AsyncClient, Chunk, Unavailable

    cuttable, address = proxy
    async with AsyncClient(address) as client:
        stream = client.stream("x", mode="stream", max_tokens_per_chunk=1, labels=SLOW)
        with pytest.raises(Unavailable):
            async for event in stream:
                if isinstance(event, Chunk) and event.sequence == 3:
                    cuttable.cut()
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
