"""The stream contract as a caller sees it through the generated stubs."""

from __future__ import annotations

import asyncio
import hashlib
import re

import grpc
import pytest
from google.protobuf import duration_pb2

from tests.conftest import (
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    respond_request,
    stream_request,
    user,
)
from tokenwire.v1 import respond_pb2 as pb


def assert_contiguous(chunks: list[pb.TokenChunk]) -> str:
    """Checks sequences and byte offsets; returns the reassembled text."""
    offset = 0
    for index, chunk in enumerate(chunks, start=1):
        assert chunk.sequence == index
        assert chunk.text_offset == offset
        offset += len(chunk.text.encode())
    return "".join(c.text for c in chunks)


async def test_stream_delivers_ordered_governed_verified_chunks(server: RunningServer) -> None:
    call = server.stub.StreamRespond(stream_request(request_id="req-1", labels={"team": "a"}))
    events = await collect(call)
    chunks = chunks_of(events)
    completed = completed_of(events)
    text = assert_contiguous(chunks)

    assert len(chunks) >= 2
    assert {c.response_id for c in chunks} == {completed.response_id}
    for chunk in chunks:
        assert chunk.governance.policy_id == "pass-through"
        assert chunk.governance.policy_version == "1"
        assert chunk.governance.model == "tokenwire-sim"
        assert chunk.governance.model_version
        assert chunk.emitted_at.seconds > 0
        assert chunk.token_count >= 1

    assert completed.final_text == text
    assert completed.final_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.verification.streamed_sha256 == completed.final_sha256
    assert completed.verification.retract_from_sequence == 0
    assert completed.chunk_count == completed.last_sequence == len(chunks)
    assert completed.finish_reason == pb.FINISH_REASON_STOP
    assert completed.usage.completion_tokens == sum(c.token_count for c in chunks) == 64
    assert completed.usage.prompt_tokens > 0
    assert completed.usage.total_tokens == (
        completed.usage.prompt_tokens + completed.usage.completion_tokens
    )
    assert completed.verdict == pb.VERDICT_ALLOWED
    assert completed.delivery_mode == pb.DELIVERY_MODE_STREAM
    assert completed.model == "tokenwire-sim" and completed.model_version
    assert (completed.policy_id, completed.policy_version) == ("pass-through", "1")
    assert re.fullmatch(r"[0-9a-f]{32}", completed.trace_id)
    assert completed.request_id == "req-1"
    assert completed.serving.backend == "simulator"
    assert completed.serving.path == pb.SERVING_PATH_STREAMING
    assert completed.serving.attempts == 1
    assert (
        completed.timing.total.ToNanoseconds()
        >= completed.timing.time_to_first_token.ToNanoseconds()
        > 0
    )
    assert ("x-request-id", "req-1") in list(await call.initial_metadata())


async def test_server_assigns_and_echoes_a_request_id(server: RunningServer) -> None:
    call = server.stub.StreamRespond(stream_request())
    completed = completed_of(await collect(call))
    echoed = dict(await call.initial_metadata())["x-request-id"]
    assert echoed.startswith("req_") and completed.request_id == echoed


async def test_request_id_header_is_used_when_the_field_is_empty(server: RunningServer) -> None:
    call = server.stub.StreamRespond(stream_request(), metadata=(("x-request-id", "hdr-7"),))
    assert completed_of(await collect(call)).request_id == "hdr-7"


async def test_buffered_sends_one_chunk_with_the_whole_payload(server: RunningServer) -> None:
    events = await collect(
        server.stub.StreamRespond(stream_request(delivery_mode=pb.DELIVERY_MODE_BUFFERED))
    )
    chunks = chunks_of(events)
    completed = completed_of(events)
    assert len(chunks) == 1 and chunks[0].sequence == 1 and chunks[0].text_offset == 0
    assert chunks[0].text == completed.final_text
    assert chunks[0].token_count == completed.usage.completion_tokens
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_buffered_empty_answer_sends_one_empty_chunk(server: RunningServer) -> None:
    request = stream_request(
        delivery_mode=pb.DELIVERY_MODE_BUFFERED, labels={"tokenwire.sim/answer-tokens": "0"}
    )
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    completed = completed_of(events)
    assert [(c.sequence, c.text) for c in chunks] == [(1, "")]
    assert completed.final_sha256 == hashlib.sha256(b"").hexdigest()
    assert completed.chunk_count == 1
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_auto_buffers_answers_short_by_max_tokens(server: RunningServer) -> None:
    request = stream_request(
        delivery_mode=pb.DELIVERY_MODE_AUTO, params=pb.GenerationParams(max_tokens=10)
    )
    events = await collect(server.stub.StreamRespond(request))
    assert len(chunks_of(events)) == 1
    completed = completed_of(events)
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    assert completed.finish_reason == pb.FINISH_REASON_LENGTH
    assert completed.usage.completion_tokens == 10


async def test_auto_buffers_answers_that_finish_inside_the_window(
    start_server: StartServer,
) -> None:
    server = await start_server(auto_buffer_window=5.0, sim_inter_token_delay=0)
    events = await collect(server.stub.StreamRespond(stream_request(delivery_mode=0)))
    assert completed_of(events).delivery_mode == pb.DELIVERY_MODE_BUFFERED
    assert len(chunks_of(events)) == 1


async def test_auto_streams_long_answers(start_server: StartServer) -> None:
    server = await start_server(auto_buffer_window=0.01, sim_inter_token_delay=0.005)
    events = await collect(
        server.stub.StreamRespond(stream_request(delivery_mode=pb.DELIVERY_MODE_AUTO))
    )
    completed = completed_of(events)
    assert completed.delivery_mode == pb.DELIVERY_MODE_STREAM
    assert len(chunks_of(events)) > 1
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_utf8_offsets_count_bytes_not_characters(server: RunningServer) -> None:
    text = "naïve café — 🎉 über résumé 日本語 ok"
    request = stream_request(text, model="echo", labels={"tokenwire.sim/echo-token-chars": "3"})
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    assert assert_contiguous(chunks) == text
    assert chunks[-1].text_offset + len(chunks[-1].text.encode()) == len(text.encode())
    assert completed_of(events).final_text == text


async def test_omit_final_text_keeps_digest_and_counts(server: RunningServer) -> None:
    events = await collect(server.stub.StreamRespond(stream_request(omit_final_text=True)))
    chunks = chunks_of(events)
    completed = completed_of(events)
    text = assert_contiguous(chunks)
    assert completed.final_text == ""
    assert completed.final_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert completed.chunk_count == len(chunks)
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_unary_returns_the_same_verified_payload_without_chunks(
    server: RunningServer,
) -> None:
    params = pb.GenerationParams(seed=42)
    unary = await server.stub.Respond(respond_request(params=params))
    streamed = completed_of(await collect(server.stub.StreamRespond(stream_request(params=params))))
    completed = unary.completed
    assert completed.final_text == streamed.final_text
    assert completed.final_sha256 == streamed.final_sha256
    assert completed.chunk_count == completed.last_sequence == 0
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.verification.streamed_sha256 == completed.final_sha256
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    assert completed.usage.completion_tokens == 64
    assert re.fullmatch(r"[0-9a-f]{32}", completed.trace_id)


async def test_seed_makes_answers_reproducible_and_distinct(server: RunningServer) -> None:
    async def answer(seed: int) -> str:
        response = await server.stub.Respond(respond_request(params=pb.GenerationParams(seed=seed)))
        return response.completed.final_text

    assert await answer(1) == await answer(1)
    assert await answer(1) != await answer(2)


async def test_stop_sequence_ends_generation_before_the_stop(server: RunningServer) -> None:
    text = "alpha beta STOP gamma delta"
    request = stream_request(text, model="echo", params=pb.GenerationParams(stop=["STOP"]))
    completed = completed_of(await collect(server.stub.StreamRespond(request)))
    assert completed.final_text == "alpha beta "
    assert completed.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


async def test_max_tokens_per_chunk_bounds_coalescing(start_server: StartServer) -> None:
    server = await start_server(sim_inter_token_delay=0)
    request = stream_request(chunking=pb.Chunking(max_tokens_per_chunk=4))
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    assert all(1 <= c.token_count <= 4 for c in chunks)
    assert sum(c.token_count for c in chunks) == 64
    assert_contiguous(chunks)


async def test_one_token_per_chunk_when_asked(server: RunningServer) -> None:
    request = stream_request(chunking=pb.Chunking(max_tokens_per_chunk=1))
    chunks = chunks_of(await collect(server.stub.StreamRespond(request)))
    assert len(chunks) == 64 and all(c.token_count == 1 for c in chunks)


async def test_max_delay_coalesces_slow_tokens_into_fewer_chunks(
    start_server: StartServer,
) -> None:
    server = await start_server(sim_inter_token_delay=0.002)
    delay = duration_pb2.Duration(nanos=200_000_000)
    request = stream_request(
        chunking=pb.Chunking(max_tokens_per_chunk=16, max_delay=delay),
    )
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    # 64 tokens at 2 ms each take ~130 ms; with a 200 ms fill window every chunk
    # but the last is full.
    assert [c.token_count for c in chunks[:-1]] == [16] * (len(chunks) - 1)
    assert len(chunks) == 4


async def test_heartbeats_fill_long_silences_without_sequences(
    start_server: StartServer,
) -> None:
    server = await start_server(heartbeat_interval=0.05)
    request = stream_request(labels={"tokenwire.sim/ttft-ms": "400"})
    events = await collect(server.stub.StreamRespond(request))
    kinds = [e.WhichOneof("event") for e in events]
    first_chunk = kinds.index("chunk")
    assert kinds[:first_chunk].count("heartbeat") >= 3
    heartbeat = events[0].heartbeat
    assert heartbeat.response_id == completed_of(events).response_id
    assert heartbeat.emitted_at.seconds > 0
    assert_contiguous(chunks_of(events))


async def test_buffered_mode_sends_heartbeats_while_waiting(start_server: StartServer) -> None:
    server = await start_server(heartbeat_interval=0.05)
    request = stream_request(
        delivery_mode=pb.DELIVERY_MODE_BUFFERED, labels={"tokenwire.sim/ttft-ms": "300"}
    )
    events = await collect(server.stub.StreamRespond(request))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("heartbeat") >= 2
    assert kinds[-2:] == ["chunk", "completed"]


@pytest.mark.parametrize("system", ["", "Answer briefly."])
async def test_conversation_roles_are_accepted(server: RunningServer, system: str) -> None:
    messages = [user("first question"), pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="answer")]
    if system:
        messages.insert(0, pb.ChatMessage(role=pb.ROLE_SYSTEM, content=system))
    messages.append(user("follow-up"))
    response = await server.stub.Respond(respond_request(messages=messages, model="echo"))
    assert response.completed.final_text == "follow-up"


@pytest.mark.parametrize("mode", [pb.DELIVERY_MODE_BUFFERED, pb.DELIVERY_MODE_AUTO])
async def test_answers_larger_than_the_stream_buffer_complete_when_nothing_streams(
    start_server: StartServer, mode: int
) -> None:
    """The pending-text bound is backpressure for streaming readers only."""
    server = await start_server(max_pending_chars=20)
    text = "0123456789" * 20
    request = stream_request(
        text, model="echo", delivery_mode=mode, params=pb.GenerationParams(max_tokens=16)
    )
    events = await collect(server.stub.StreamRespond(request, timeout=10))
    assert [c.text for c in chunks_of(events)] == [text[:64]]
    unary = await server.stub.Respond(respond_request(text, model="echo"), timeout=10)
    assert unary.completed.final_text == text


async def test_a_slow_reader_gets_coalesced_chunks_with_bounded_buffering(
    start_server: StartServer,
) -> None:
    server = await start_server(max_pending_chars=40, sim_inter_token_delay=0)
    text = "abcdefghij" * 30
    request = stream_request(text, model="echo", chunking=pb.Chunking(max_tokens_per_chunk=64))
    call = server.stub.StreamRespond(request)
    first = await call.read()
    await asyncio.sleep(0)  # let generation run ahead into the bounded buffer
    events = [first]
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    chunks = chunks_of(events)
    assert assert_contiguous(chunks) == text
    assert max(len(c.text) for c in chunks) <= 40 + 4
