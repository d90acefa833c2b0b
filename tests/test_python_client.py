"""The Python client library against a real server: checks, reassembly, typed errors."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, StartServer
from tests.test_interceptors import RewritingPolicy
from tokenwire import (
    AsyncClient,
    Chunk,
    Client,
    Completion,
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    Retraction,
    Unavailable,
)
from tokenwire.stream import StreamAssembler
from tokenwire.v1 import respond_pb2 as pb


async def test_async_stream_reassembles_and_verifies(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        stream = client.stream("hello", mode="stream", request_id="cli-1", max_tokens_per_chunk=2)
        events = [event async for event in stream]
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert isinstance(events[-1], Completion)
    result = events[-1].result
    assert result.verified and result.retraction is None
    assert result.text == "".join(c.text for c in chunks) == result.completed.final_text
    assert result.chunk_count == len(chunks) == result.completed.last_sequence
    assert result.request_id == "cli-1"
    assert all(c.token_count <= 2 for c in chunks)


async def test_async_unary_and_buffered(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        unary = await client.respond("same prompt", seed=5)
        buffered = await client.stream("same prompt", seed=5, mode="buffered").collect()
    assert unary.verified and buffered.verified
    assert unary.text == buffered.text and unary.chunk_count == 0 and buffered.chunk_count == 1
    assert unary.request_id.startswith("req_")


async def test_sync_client_streams_and_calls_unary(server: RunningServer) -> None:
    def run() -> tuple[str, str]:
        with Client(server.address) as client:
            streamed = client.stream("sync", model="echo", mode="stream").collect()
            unary = client.respond("sync", model="echo")
        return streamed.text, unary.text

    assert await asyncio.to_thread(run) == ("sync", "sync")


async def test_retraction_is_an_explicit_event(start_server: StartServer) -> None:
    server = await start_server(policy=RewritingPolicy("I can't help with that."))
    async with AsyncClient(server.address) as client:
        stream = client.stream(
            "abcdefghij",
            model="echo",
            mode="stream",
            max_tokens_per_chunk=1,
            labels={"tokenwire.sim/echo-token-chars": "2"},
        )
        events = [event async for event in stream]
    retractions = [e for e in events if isinstance(e, Retraction)]
    assert len(retractions) == 1
    retraction = retractions[0]
    assert retraction.from_sequence == 1 and retraction.kept_text == ""
    assert retraction.final_text == "I can't help with that."
    result = stream.result
    assert result is not None and result.retraction == retraction
    assert result.text == "I can't help with that." and result.verified


async def test_invalid_argument_carries_field_violations(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(InvalidArgument) as raised:
            await client.stream("x", max_tokens=10**6).collect()
    assert raised.value.reason == "MAX_TOKENS_TOO_LARGE"
    assert raised.value.domain == "tokenwire.dev"
    assert [v.field for v in raised.value.field_violations] == ["params.max_tokens"]


async def test_unknown_model_is_typed_not_found(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(NotFound) as raised:
            await client.respond("x", model="missing")
    assert raised.value.reason == "MODEL_NOT_FOUND"


async def test_mid_stream_failure_reports_last_sequence_and_retry(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        stream = client.stream(
            "x",
            mode="stream",
            max_tokens_per_chunk=1,
            labels={"tokenwire.sim/fail-after": "4", "tokenwire.sim/inter-token-ms": "1"},
        )
        with pytest.raises(Unavailable) as raised:
            async for _ in stream:
                pass
    assert raised.value.last_sequence == stream.last_sequence == 4
    assert raised.value.retry_delay is not None and raised.value.retry_delay >= 1


async def test_client_deadline_is_enforced(server: RunningServer) -> None:
    async with AsyncClient(server.address, timeout=0.2) as client:
        with pytest.raises(DeadlineExceeded):
            await client.respond("x", labels={"tokenwire.sim/ttft-ms": "5000"})


def _chunk(sequence: int, text: str, offset: int) -> pb.StreamRespondResponse:
    return pb.StreamRespondResponse(
        chunk=pb.TokenChunk(response_id="r", sequence=sequence, text=text, text_offset=offset)
    )


def test_assembler_rejects_a_gap() -> None:
    assembler = StreamAssembler()
    assembler.feed(_chunk(1, "ab", 0))
    with pytest.raises(ProtocolError) as raised:
        assembler.feed(_chunk(3, "cd", 2))
    assert raised.value.last_sequence == 1


def test_assembler_rejects_a_wrong_offset() -> None:
    assembler = StreamAssembler()
    assembler.feed(_chunk(1, "é", 0))
    with pytest.raises(ProtocolError):
        assembler.feed(_chunk(2, "x", 1))  # "é" is two bytes


def test_assembler_rejects_a_digest_mismatch() -> None:
    assembler = StreamAssembler()
    assembler.feed(_chunk(1, "ab", 0))
    completed = pb.Completed(
        response_id="r",
        final_sha256=hashlib.sha256(b"abc").hexdigest(),
        chunk_count=1,
        last_sequence=1,
        verification=pb.Verification(status=pb.VERIFICATION_STATUS_VERIFIED),
    )
    with pytest.raises(IntegrityError):
        assembler.feed(pb.StreamRespondResponse(completed=completed))


def test_assembler_rejects_events_after_completed() -> None:
    assembler = StreamAssembler()
    completed = pb.Completed(
        final_sha256=hashlib.sha256(b"").hexdigest(),
        verification=pb.Verification(status=pb.VERIFICATION_STATUS_VERIFIED),
    )
    assembler.feed(pb.StreamRespondResponse(completed=completed))
    with pytest.raises(ProtocolError):
        assembler.feed(_chunk(1, "late", 0))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=120),
    token_chars=st.integers(1, 7),
    per_chunk=st.integers(1, 5),
)
async def test_any_text_split_any_way_reassembles_exactly(
    server: RunningServer, text: str, token_chars: int, per_chunk: int
) -> None:
    async with AsyncClient(server.address) as client:
        result = await client.stream(
            text,
            model="echo",
            mode="stream",
            max_tokens_per_chunk=per_chunk,
            labels={"tokenwire.sim/echo-token-chars": str(token_chars)},
        ).collect()
    assert result.text == text and result.verified


async def test_a_caller_that_stops_reading_stops_generation(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        stream = client.stream(
            "x",
            mode="stream",
            max_tokens_per_chunk=1,
            labels={"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "500"},
        )
        seen = 0
        async for event in stream:
            seen += isinstance(event, Chunk)
            if seen == 3:
                break
        await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
    assert server.simulator.stats.finished == 0


async def test_sync_caller_that_stops_reading_stops_generation(server: RunningServer) -> None:
    def read_three() -> None:
        with Client(server.address) as client:
            stream = client.stream(
                "x",
                mode="stream",
                labels={"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "500"},
            )
            for index, _ in enumerate(stream):
                if index == 2:
                    break

    await asyncio.to_thread(read_three)
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
