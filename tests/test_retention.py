"""Ended responses are kept packed (delivery/packing.py): replay from the packed
form is exact for every kind of ending, and `store_max_bytes` bounds the
memory they really take, so a server that has served many calls is as big as
a fresh one plus that bound."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc

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
from tokenwire_server.delivery.response import LiveResponse
from tokenwire_server.store.memory import InMemoryResponseStore

ONE_TOKEN_CHUNKS = pb.Chunking(max_tokens_per_chunk=1)


def resume_from(response_id: str, after: int = 0, **fields: object) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=response_id, after_sequence=after), **fields
    )


async def replayed(
    server: RunningServer, response_id: str, after: int = 0, **fields: object
) -> list:
    """A resume call; `fields` are its own (omit_final_text is each call's choice)."""
    return await collect(server.stub.StreamRespond(resume_from(response_id, after, **fields)))


async def packed_once_idle(server: RunningServer, response_id: str) -> None:
    """The store packs a response once its last reader left; the reader's release
    runs in the call's done callback, so wait for that on the loop."""
    store = server.server.store
    assert isinstance(store, InMemoryResponseStore)
    for _ in range(1000):
        if store.is_packed(response_id):
            return
        await asyncio.sleep(0)  # yields to the done callbacks, no timing involved
    raise AssertionError(f"{response_id} was never packed")


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="plain"),
        pytest.param({"delivery_mode": pb.DELIVERY_MODE_BUFFERED}, id="buffered"),
        pytest.param({"omit_final_text": True}, id="omit-final-text"),
        pytest.param(
            {"messages": [pb.ChatMessage(role=pb.ROLE_USER, content="naïve 東京 🔑 " * 20)]},
            id="multi-byte",
        ),
    ],
)
async def test_a_packed_stream_replays_chunk_for_chunk(
    start_server: StartServer, fields: dict
) -> None:
    server = await start_server()
    request = stream_request(
        model="echo",
        chunking=ONE_TOKEN_CHUNKS,
        labels={"tokenwire.sim/answer-tokens": "48"},
        **fields,
    )
    first = await collect(server.stub.StreamRespond(request))
    response_id = completed_of(first).response_id
    await packed_once_idle(server, response_id)
    omit = {"omit_final_text": True} if fields.get("omit_final_text") else {}
    replay = await replayed(server, response_id, **omit)
    assert chunks_of(replay) == chunks_of(first)
    assert completed_of(replay) == completed_of(first)
    # From the middle, too: the same sequences, offsets and emission times.
    middle = len(chunks_of(first)) // 2
    assert chunks_of(await replayed(server, response_id, middle)) == chunks_of(first)[middle:]


async def test_a_packed_redacted_stream_replays_its_actions(start_server: StartServer) -> None:
    server = await start_server(policy="builtin:default")
    request = stream_request(
        "mail ops@example.com or call +1 415 555 0100 today",
        model="echo",
        chunking=ONE_TOKEN_CHUNKS,
    )
    first = await collect(server.stub.StreamRespond(request))
    completed = completed_of(first)
    assert "ops@example.com" not in completed.final_text and completed.actions
    await packed_once_idle(server, completed.response_id)
    replay = await replayed(server, completed.response_id)
    assert chunks_of(replay) == chunks_of(first)
    assert any(chunk.governance.actions for chunk in chunks_of(replay))
    assert completed_of(replay) == completed


async def test_a_packed_tool_call_response_replays_its_fragments(
    start_server: StartServer,
) -> None:
    server = await start_server()
    calls = [{"name": "lookup", "arguments": '{"city": "Paris", "days": 3}', "id": "call_1"}]
    request = stream_request(
        chunking=ONE_TOKEN_CHUNKS,
        tools=[pb.Tool(name="lookup")],
        labels={"tokenwire.sim/tool-calls": json.dumps(calls)},
    )
    first = await collect(server.stub.StreamRespond(request))
    completed = completed_of(first)
    assert [call.name for call in completed.tool_calls] == ["lookup"]
    await packed_once_idle(server, completed.response_id)
    replay = await replayed(server, completed.response_id)
    assert chunks_of(replay) == chunks_of(first)
    assert completed_of(replay) == completed


async def test_a_packed_failed_stream_replays_its_chunks_and_its_status(
    start_server: StartServer,
) -> None:
    server = await start_server()
    request = stream_request(
        chunking=ONE_TOKEN_CHUNKS,
        request_id="fails-1",
        labels={"tokenwire.sim/fail-after": "5"},
    )
    call = server.stub.StreamRespond(request)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as first_error:
        async for event in call:
            received.append(event)
    first = status_details(first_error.value)
    response_id = first.error_info.metadata["responseId"]
    await packed_once_idle(server, response_id)
    # A retry with the same request id sees the same ending, from the packed form.
    retry = server.stub.StreamRespond(request)
    retried = []
    with pytest.raises(grpc.aio.AioRpcError) as retry_error:
        async for event in retry:
            retried.append(event)
    assert chunks_of(retried) == chunks_of(received)
    again = status_details(retry_error.value)
    assert (again.code, again.error_info.reason) == (first.code, first.error_info.reason)
    assert retry_error.value.trailing_metadata() == first_error.value.trailing_metadata()


async def test_a_packed_unary_response_answers_its_retry(start_server: StartServer) -> None:
    server = await start_server()
    request = respond_request(request_id="unary-1", labels={"tokenwire.sim/answer-tokens": "12"})
    first = (await server.stub.Respond(request)).completed
    await packed_once_idle(server, first.response_id)
    again = (await server.stub.Respond(request)).completed
    assert (again.response_id, again.final_text, again.final_sha256) == (
        first.response_id,
        first.final_text,
        first.final_sha256,
    )
    assert server.simulator.stats.finished == 1


async def test_store_max_bytes_bounds_the_memory_ended_responses_take(
    start_server: StartServer,
) -> None:
    """tracemalloc counts every Python allocation the server makes: after the
    store is full, hundreds more calls (streams and unary calls, ~2 KB packed
    each) leave the traced memory where it was, within the bound."""
    bound = 200_000
    server = await start_server(store_max_bytes=bound, store_max_responses=100_000)
    stream = stream_request(chunking=ONE_TOKEN_CHUNKS, labels={"tokenwire.sim/answer-tokens": "64"})
    unary = respond_request(labels={"tokenwire.sim/answer-tokens": "64"})

    async def calls(count: int) -> None:
        for _ in range(count // 10):
            await asyncio.gather(
                *(collect(server.stub.StreamRespond(stream)) for _ in range(5)),
                *(server.stub.Respond(unary) for _ in range(5)),
            )

    await calls(20)  # warm-up: caches, interned strings, the loop's own structures
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await calls(400)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    store = server.server.store
    assert isinstance(store, InMemoryResponseStore)
    assert store.retained_bytes <= bound
    assert 0 < len(store) < 400  # the bound, not the response count, evicted
    # Kept whole, these 400 responses took ~5.6 MB; packed, the store holds the
    # bound's worth, and the rest is the calls' own passing garbage (~0.15 MB).
    assert after - before <= bound + 200_000, (before, after)


async def test_a_response_read_while_it_is_packed_is_a_copy_that_reads_the_same(
    start_server: StartServer,
) -> None:
    server = await start_server()
    request = stream_request(chunking=ONE_TOKEN_CHUNKS)
    first = await collect(server.stub.StreamRespond(request))
    response_id = completed_of(first).response_id
    await packed_once_idle(server, response_id)
    kept = await server.server.store.get(response_id)
    assert isinstance(kept, LiveResponse) and kept.done
    assert [c.text for c in kept.chunks] == [c.text for c in chunks_of(first)]
    # Two replays at once from the same packed bytes: both exact.
    both = await asyncio.gather(replayed(server, response_id), replayed(server, response_id))
    assert chunks_of(both[0]) == chunks_of(both[1]) == chunks_of(first)
