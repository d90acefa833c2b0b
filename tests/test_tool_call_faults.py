"""Tool calls under faults and timing, through the real gRPC surface (issue 23).

An adversarial reviewer's view of the tool-call delivery: cut connections and
resumes landing inside a call or at its boundary, idempotent retries, a second
replica behind a shared Redis, slow readers that make fragments coalesce,
Cancel / deadline / backend failure mid-call, BUFFERED and AUTO, unary,
a policy blocking on an argument value, `omit_final_text`, and an upstream
that interleaves calls with odd indices and puts text after a call.

The simulator's `tokenwire.sim/tool-calls` label scripts the calls (~4
characters a fragment, one fragment per token step); the OpenAI-compatible
upstream fixture scripts raw SSE where the simulator cannot (interleaving).
Every stream is checked against the whole contract by `check_stream`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

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
from tests.tcp_proxy import CuttableProxy
from tests.test_openai_upstream import route, sse
from tests.test_tool_calls import assembled, delta_event, tools
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

WEATHER_ARGS = '{"city": "Oslo", "days": 3}'
#: Multi-byte characters, so `arguments_offset` (bytes) and characters differ.
MAIL_ARGS = '{"to": "ops", "body": "héllo ✓ — ok"}'
CALLS = [
    {"name": "get_weather", "arguments": WEATHER_ARGS, "id": "call_w"},
    {"name": "send_mail", "arguments": MAIL_ARGS},
]
FRAGMENT_CHARS = 4


def fragments_of(arguments: str) -> int:
    return -(-len(arguments) // FRAGMENT_CHARS)


def labels(
    calls: list[dict[str, str]] | None = None, text_tokens: int = 0, **knobs: object
) -> dict[str, str]:
    values = {
        "tokenwire.sim/tool-calls": json.dumps(
            CALLS if calls is None else calls, ensure_ascii=False
        )
    }
    if text_tokens:
        values["tokenwire.sim/answer-tokens"] = str(text_tokens)
    values.update({f"tokenwire.sim/{k.replace('_', '-')}": str(v) for k, v in knobs.items()})
    return values


def sim_request(
    calls: list[dict[str, str]] | None = None,
    text_tokens: int = 0,
    knobs: dict[str, object] | None = None,
    cap: int = 1,
    **fields: Any,
) -> pb.StreamRespondRequest:
    fields.setdefault("tools", tools())
    fields.setdefault("labels", labels(calls, text_tokens, **(knobs or {})))
    fields.setdefault("chunking", pb.Chunking(max_tokens_per_chunk=cap))
    return stream_request("What is the weather in Oslo?", **fields)


def resume(response_id: str, after: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=response_id, after_sequence=after)
    )


def check_stream(
    chunks: list[pb.TokenChunk], completed: pb.Completed, *, omitted: bool = False
) -> dict[int, tuple[str, str, str]]:
    """The whole contract for a verified stream with tool calls; the calls as rebuilt."""
    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    offset = 0
    for chunk in chunks:
        assert chunk.text_offset == offset, chunk
        if chunk.HasField("tool_call"):
            assert chunk.text == ""
        offset += len(chunk.text.encode())
    text = "".join(c.text for c in chunks)
    calls = assembled(chunks)  # checks numbering, id/name placement and arguments_offset
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED, completed
    assert completed.verification.retract_from_sequence == 0
    assert completed.last_sequence == completed.chunk_count == len(chunks)
    assert hashlib.sha256(text.encode()).hexdigest() == completed.final_sha256
    assert completed.final_text == ("" if omitted else text)
    assert [(c.id, c.name, c.arguments) for c in completed.tool_calls] == [
        calls[i] for i in range(len(calls))
    ]
    checks = {c.name: c.outcome for c in completed.verification.checks}
    assert checks["integrity"] == pb.CHECK_OUTCOME_PASSED
    return calls


def check_script(completed: pb.Completed, calls: list[dict[str, str]] | None = None) -> None:
    script = CALLS if calls is None else calls
    assert [(c.name, c.arguments) for c in completed.tool_calls] == [
        (s["name"], s["arguments"]) for s in script
    ]
    for call, scripted in zip(completed.tool_calls, script, strict=True):
        if "id" in scripted:
            assert call.id == scripted["id"]
        else:
            assert call.id.startswith("call_") and len(call.id) == 29
    assert completed.finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def read_until(call: Any, stop: Callable[[list[pb.TokenChunk]], bool]) -> list[pb.TokenChunk]:
    held: list[pb.TokenChunk] = []
    async for event in call:
        if event.HasField("chunk"):
            held.append(event.chunk)
            if stop(held):
                return held
    raise AssertionError(f"the stream ended before the condition held: {held}")


def inside_first_call(fragments: int) -> Callable[[list[pb.TokenChunk]], bool]:
    """Holds `fragments` fragments of call 0 (not all of them)."""

    def stop(held: list[pb.TokenChunk]) -> bool:
        begun = [c for c in held if c.HasField("tool_call") and c.tool_call.index == 0]
        return len(begun) == fragments

    return stop


def at_first_call_end(held: list[pb.TokenChunk]) -> bool:
    """Holds call 0 whole and nothing of call 1."""
    parts = [c.tool_call.arguments for c in held if c.HasField("tool_call")]
    return "".join(parts) == WEATHER_ARGS


def as_tuple(chunk: pb.TokenChunk) -> tuple[object, ...]:
    delta = chunk.tool_call
    return (
        chunk.sequence,
        chunk.text,
        chunk.text_offset,
        chunk.token_count,
        chunk.HasField("tool_call"),
        (delta.index, delta.id, delta.name, delta.arguments, delta.arguments_offset),
    )


async def response_of(running: RunningServer, response_id: str) -> Any:
    live = await running.server.store.get(response_id)
    assert live is not None
    return live


# ----- (1) resume after a cut connection ---------------------------------------


@pytest.mark.parametrize(
    "stop",
    [inside_first_call(2), at_first_call_end],
    ids=["inside-a-call", "at-a-call-boundary"],
)
async def test_a_cut_connection_resumes_mid_call_with_identical_fragments(
    server: RunningServer, stop: Callable[[list[pb.TokenChunk]], bool]
) -> None:
    host, port = server.address.rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    address = await proxy.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            call = stub.StreamRespond(
                sim_request(text_tokens=3, knobs={"inter_token_ms": 8}, resumable=True)
            )
            held = await read_until(call, stop)
            proxy.cut()  # the network drops mid-call; generation goes on (resumable)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await proxy.close()
    events = await collect(server.stub.StreamRespond(resume(held[0].response_id, len(held))))
    rest = chunks_of(events)
    completed = completed_of(events)
    if stop is at_first_call_end:
        first = rest[0].tool_call
        assert (first.index, first.name, first.arguments_offset) == (1, "send_mail", 0)
        assert first.id.startswith("call_")
    else:
        assert rest[0].tool_call.index == 0 and not rest[0].tool_call.id
        assert rest[0].tool_call.arguments_offset == 2 * FRAGMENT_CHARS
    check_stream(held + rest, completed)
    check_script(completed)
    stats = server.simulator.stats
    assert (stats.started, stats.cancelled, stats.finished) == (1, 0, 1)


async def test_every_resume_point_of_a_finished_response_replays_its_suffix(
    server: RunningServer,
) -> None:
    first = await collect(server.stub.StreamRespond(sim_request(text_tokens=2, resumable=True)))
    chunks, completed = chunks_of(first), completed_of(first)
    check_stream(chunks, completed)
    assert len(chunks) == 2 + fragments_of(WEATHER_ARGS) + fragments_of(MAIL_ARGS)
    for after in range(len(chunks) + 1):
        events = await collect(server.stub.StreamRespond(resume(completed.response_id, after)))
        assert chunks_of(events) == chunks[after:], after
        again = completed_of(events)
        # the gate rebuilt what the caller holds from the replayed prefix
        assert again.verification.status == pb.VERIFICATION_STATUS_VERIFIED, after
        assert again.tool_calls == completed.tool_calls
        assert again.final_sha256 == completed.final_sha256
    assert server.simulator.stats.started == 1


async def test_a_resume_that_says_it_holds_less_than_it_read_gets_the_rest_again(
    server: RunningServer,
) -> None:
    """The caller read into call 1, but only trusts what it held at call 0's
    middle: the resumed stream restarts there, live, and still verifies."""
    call = server.stub.StreamRespond(sim_request(knobs={"inter_token_ms": 8}, resumable=True))
    held = await read_until(call, lambda h: any(c.tool_call.index == 1 for c in h))
    call.cancel()
    kept = held[:3]
    events = await collect(server.stub.StreamRespond(resume(held[0].response_id, len(kept))))
    rest = chunks_of(events)
    assert rest[: len(held) - 3] == held[3:]
    check_stream(kept + rest, completed_of(events))


# ----- (2) idempotent retries ----------------------------------------------------


async def test_a_retried_request_id_attaches_and_replays_identical_fragments(
    server: RunningServer,
) -> None:
    request = sim_request(
        text_tokens=2, knobs={"inter_token_ms": 3}, resumable=True, request_id="tc-retry-1"
    )
    # the first attempt is dropped mid-call, then two retries race
    dropped = server.stub.StreamRespond(request)
    held = await read_until(dropped, inside_first_call(1))
    dropped.cancel()
    first, second = await asyncio.gather(
        collect(server.stub.StreamRespond(request)), collect(server.stub.StreamRespond(request))
    )
    assert [as_tuple(c) for c in chunks_of(first)] == [as_tuple(c) for c in chunks_of(second)]
    assert [as_tuple(c) for c in held] == [as_tuple(c) for c in chunks_of(first)[: len(held)]]
    calls = check_stream(chunks_of(first), completed_of(first))
    check_stream(chunks_of(second), completed_of(second))
    assert completed_of(first).response_id == completed_of(second).response_id
    third = await collect(server.stub.StreamRespond(request))
    assert chunks_of(third) == chunks_of(first)
    assert assembled(chunks_of(third)) == calls
    unary = await server.stub.Respond(
        respond_request(
            "What is the weather in Oslo?",
            request_id="tc-retry-2",
            tools=tools(),
            labels=labels(text_tokens=2, inter_token_ms=1),
        )
    )
    again = await server.stub.Respond(
        respond_request(
            "What is the weather in Oslo?",
            request_id="tc-retry-2",
            tools=tools(),
            labels=labels(text_tokens=2, inter_token_ms=1),
        )
    )
    assert again.completed.tool_calls == unary.completed.tool_calls
    assert again.completed.response_id == unary.completed.response_id
    assert server.simulator.stats.started == 2


# ----- (3) two replicas sharing a real Redis -------------------------------------


async def test_another_replica_resumes_and_replays_the_fragments(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(store=redis_server.url, lease_seconds=1)
    b = await start_server(store=redis_server.url, lease_seconds=1)
    call = a.stub.StreamRespond(
        sim_request(text_tokens=2, knobs={"inter_token_ms": 8}, resumable=True)
    )
    held = await read_until(call, inside_first_call(3))
    call.cancel()  # the connection to A drops mid-call; A keeps generating
    response_id = held[0].response_id
    events = await collect(b.stub.StreamRespond(resume(response_id, len(held))))
    completed = completed_of(events)
    calls = check_stream(held + chunks_of(events), completed)
    check_script(completed)
    assert b.simulator.stats.started == 0 and a.simulator.stats.finished == 1
    # Both replicas replay the finished response identically, from inside a call too.
    for after in (0, len(held), len(held) + 1):
        on_a = await collect(a.stub.StreamRespond(resume(response_id, after)))
        on_b = await collect(b.stub.StreamRespond(resume(response_id, after)))
        assert [as_tuple(c) for c in chunks_of(on_a)] == [as_tuple(c) for c in chunks_of(on_b)]
        assert completed_of(on_b).tool_calls == completed_of(on_a).tool_calls
        assert completed_of(on_b).verification.status == pb.VERIFICATION_STATUS_VERIFIED
    replay = chunks_of(await collect(b.stub.StreamRespond(resume(response_id, 0))))
    assert assembled(replay) == calls


@pytest.mark.parametrize("mode", [pb.DELIVERY_MODE_STREAM, pb.DELIVERY_MODE_BUFFERED])
async def test_a_finished_tool_call_response_replays_on_another_replica(
    start_server: StartServer, redis_server: RedisServer, mode: int
) -> None:
    # At zero delay generation ends before any reader cuts a chunk: the log must
    # still hold every fragment before the ending.
    a = await start_server(store=redis_server.url, lease_seconds=1, sim_inter_token_delay=0)
    b = await start_server(store=redis_server.url, lease_seconds=1, sim_inter_token_delay=0)
    first = await collect(
        a.stub.StreamRespond(sim_request(text_tokens=2, resumable=True, delivery_mode=mode))
    )
    completed = completed_of(first)
    check_stream(chunks_of(first), completed)
    replay = await collect(b.stub.StreamRespond(resume(completed.response_id, 0)))
    assert [as_tuple(c) for c in chunks_of(replay)] == [as_tuple(c) for c in chunks_of(first)]
    assert completed_of(replay).tool_calls == completed.tool_calls
    assert completed_of(replay).verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_a_buffered_call_resumed_live_on_another_replica_arrives_whole(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(store=redis_server.url, lease_seconds=1, heartbeat_interval=0.02)
    b = await start_server(store=redis_server.url, lease_seconds=1)
    call = a.stub.StreamRespond(
        sim_request(
            text_tokens=2,
            knobs={"inter_token_ms": 5},
            resumable=True,
            delivery_mode=pb.DELIVERY_MODE_BUFFERED,
        )
    )
    heartbeat = await call.read()  # nothing but heartbeats before the end in BUFFERED mode
    response_id = heartbeat.heartbeat.response_id
    call.cancel()
    events = await collect(b.stub.StreamRespond(resume(response_id, 0)))
    chunks, completed = chunks_of(events), completed_of(events)
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    check_stream(chunks, completed)
    check_script(completed)
    assert [c.HasField("tool_call") for c in chunks] == [False, True, True]
    assert a.simulator.stats.finished == 1 and b.simulator.stats.started == 0


async def test_redacted_fragments_replay_with_their_actions_on_another_replica(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    options = {"store": redis_server.url, "lease_seconds": 1, "policy": "builtin:default"}
    a = await start_server(**options)
    b = await start_server(**options)
    calls = [{"name": "send_mail", "arguments": '{"to": "bob@example.com", "body": "hï ✓"}'}]
    first = await collect(
        a.stub.StreamRespond(sim_request(calls, text_tokens=2, cap=2, resumable=True))
    )
    chunks, completed = chunks_of(first), completed_of(first)
    check_stream(chunks, completed)
    assert "bob@example.com" not in completed.tool_calls[0].arguments
    assert any(c.governance.actions for c in chunks if c.HasField("tool_call"))
    for after in (0, 3):
        replay = chunks_of(
            await collect(b.stub.StreamRespond(resume(completed.response_id, after)))
        )
        assert [(as_tuple(c), list(c.governance.actions)) for c in replay] == [
            (as_tuple(c), list(c.governance.actions)) for c in chunks[after:]
        ]


# ----- (4) slow readers: coalesced fragments, never mixed ------------------------


async def test_a_reader_behind_a_burst_gets_each_call_whole_in_one_chunk(
    start_server: StartServer,
) -> None:
    """Generation outruns the reader (no delay): everything is pending when the
    reader cuts, and with room for 64 tokens a chunk still never mixes text
    with a call, nor one call with the next."""
    running = await start_server(sim_inter_token_delay=0)
    events = await collect(running.stub.StreamRespond(sim_request(text_tokens=5, cap=64)))
    chunks, completed = chunks_of(events), completed_of(events)
    check_stream(chunks, completed)
    assert [c.HasField("tool_call") for c in chunks] == [False, True, True]
    assert [c.tool_call.arguments for c in chunks[1:]] == [WEATHER_ARGS, MAIL_ARGS]
    assert [c.token_count for c in chunks] == [
        5,
        fragments_of(WEATHER_ARGS),
        fragments_of(MAIL_ARGS),
    ]


async def test_max_delay_coalesces_fragments_of_one_call_only(server: RunningServer) -> None:
    """A reader that asks for fewer, larger chunks (the max_delay bound): the
    fragments pile up, and a cut never crosses from text to a call or from one
    call to the next, whatever the arrival timing."""
    cap = 3
    calls = [
        {"name": "get_weather", "arguments": WEATHER_ARGS},
        {"name": "send_mail", "arguments": MAIL_ARGS},
        {"name": "get_weather", "arguments": '{"city": "Bø"}'},
    ]
    events = await collect(
        server.stub.StreamRespond(
            sim_request(
                calls,
                text_tokens=4,
                chunking=pb.Chunking(max_tokens_per_chunk=cap, max_delay=_seconds(1.0)),
            )
        )
    )
    chunks, completed = chunks_of(events), completed_of(events)
    check_stream(chunks, completed)
    check_script(completed, calls)
    fragments = [c for c in chunks if c.HasField("tool_call")]
    assert all(1 <= c.token_count <= cap for c in chunks)
    assert any(c.token_count > 1 for c in fragments), "fragments coalesced"
    assert sum(c.token_count for c in chunks) == completed.usage.completion_tokens
    # call boundaries are chunk boundaries: every call starts a new chunk
    starts = [c for c in fragments if c.tool_call.arguments_offset == 0]
    assert [c.tool_call.index for c in starts] == [0, 1, 2]


async def test_backpressure_on_long_arguments_keeps_offsets_right(
    start_server: StartServer,
) -> None:
    """A pending budget far below one call's arguments: generation waits for
    the reader again and again in the middle of a call."""
    running = await start_server(sim_inter_token_delay=0, max_pending_chars=40)
    long_args = json.dumps({"to": "ops", "body": "ø✓-" * 200}, ensure_ascii=False)
    calls = [
        {"name": "send_mail", "arguments": long_args},
        {"name": "get_weather", "arguments": WEATHER_ARGS},
    ]
    events = await collect(
        running.stub.StreamRespond(sim_request(calls, text_tokens=3, cap=7, params=_max(2000)))
    )
    chunks, completed = chunks_of(events), completed_of(events)
    check_stream(chunks, completed)
    check_script(completed, calls)
    assert all(c.token_count <= 7 for c in chunks)
    assert sum(c.token_count for c in chunks) == completed.usage.completion_tokens


# ----- (5) Cancel, deadline and backend failure mid-call -------------------------


def trailer_sequence(error: grpc.aio.AioRpcError) -> int:
    details = status_details(error)
    assert (
        details.error_info.metadata["lastSequence"] == details.trailers["tokenwire-last-sequence"]
    )
    return int(details.trailers["tokenwire-last-sequence"])


async def drain_error(call: Any) -> tuple[list[pb.StreamRespondResponse], grpc.aio.AioRpcError]:
    events: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            events.append(event)
    assert not any(e.HasField("completed") for e in events), "nothing claims success"
    return events, raised.value


async def test_cancel_mid_call_ends_cancelled_with_the_last_sequence(
    server: RunningServer,
) -> None:
    long_args = json.dumps({"to": "ops", "body": "x" * 400})
    request = sim_request(
        [{"name": "send_mail", "arguments": long_args}],
        knobs={"inter_token_ms": 5},
        resumable=True,
    )
    call = server.stub.StreamRespond(request)
    held = await read_until(call, inside_first_call(2))
    cancelled = await server.stub.Cancel(pb.CancelRequest(response_id=held[0].response_id))
    assert cancelled.was_running
    events, error = await drain_error(call)
    assert error.code() == grpc.StatusCode.CANCELLED
    assert status_details(error).error_info.reason == "RESPONSE_CANCELLED"
    received = held + chunks_of(events)
    assert trailer_sequence(error) == len(received) == cancelled.last_sequence
    assembled(received)  # what did arrive is still well-formed
    # A resume replays what was sent and ends the same way, never with a Completed.
    events, error = await drain_error(server.stub.StreamRespond(resume(held[0].response_id, 1)))
    assert chunks_of(events) == received[1:]
    assert error.code() == grpc.StatusCode.CANCELLED
    assert trailer_sequence(error) == len(received)


async def test_cancel_mid_call_in_buffered_mode_sends_nothing(
    start_server: StartServer,
) -> None:
    running = await start_server(heartbeat_interval=0.02)
    call = running.stub.StreamRespond(
        sim_request(
            text_tokens=1,
            knobs={"inter_token_ms": 5, "stall_after": 3},  # hangs inside call 0
            resumable=True,
            delivery_mode=pb.DELIVERY_MODE_BUFFERED,
        )
    )
    heartbeat = await call.read()
    response_id = heartbeat.heartbeat.response_id
    cancelled = await running.stub.Cancel(pb.CancelRequest(response_id=response_id))
    assert cancelled.was_running and cancelled.last_sequence == 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while (event := await call.read()) is not grpc.aio.EOF:
            assert event.HasField("heartbeat"), event  # no chunk, no Completed
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert trailer_sequence(raised.value) == 0


async def test_an_unresumed_call_stops_when_the_detach_window_closes_mid_call(
    start_server: StartServer,
) -> None:
    running = await start_server(detach_window=0.1)
    long_args = json.dumps({"to": "ops", "body": "y" * 600})
    call = running.stub.StreamRespond(
        sim_request(
            [{"name": "send_mail", "arguments": long_args}],
            knobs={"inter_token_ms": 3},
            resumable=True,
        )
    )
    held = await read_until(call, inside_first_call(2))
    call.cancel()
    await asyncio.wait_for(running.simulator.cancelled.wait(), timeout=5)
    # what was generated while detached is in the log; the resume replays it, then the end
    events, error = await drain_error(running.stub.StreamRespond(resume(held[0].response_id, 2)))
    assert error.code() == grpc.StatusCode.CANCELLED
    received = held + chunks_of(events)
    assert trailer_sequence(error) == len(received) > 2
    assert assembled(received)[0][2] == long_args[: len(received) * FRAGMENT_CHARS]


async def test_a_deadline_mid_call_is_deadline_exceeded_with_the_last_sequence(
    start_server: StartServer,
) -> None:
    running = await start_server(default_deadline=0.3)
    # text 2 tokens, then call 0's fragments; the backend hangs at its 4th fragment
    call = running.stub.StreamRespond(sim_request(text_tokens=2, knobs={"stall_after": 5}))
    events, error = await drain_error(call)
    details = status_details(error)
    assert details.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details.error_info.reason == "DEADLINE_EXCEEDED"
    chunks = chunks_of(events)
    assert trailer_sequence(error) == len(chunks) == 5
    assert assembled(chunks)[0][2] == WEATHER_ARGS[: 3 * FRAGMENT_CHARS]
    await asyncio.wait_for(running.simulator.cancelled.wait(), timeout=5)


@pytest.mark.parametrize("knob", ["fail_after", "raise_after"])
async def test_a_backend_failure_mid_call_never_claims_success(
    server: RunningServer, knob: str
) -> None:
    fail_at = 2 + fragments_of(WEATHER_ARGS) + 1  # inside call 1
    request = sim_request(text_tokens=2, knobs={knob: fail_at}, resumable=True)
    events, error = await drain_error(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    assert len(chunks) == fail_at
    assert trailer_sequence(error) == fail_at
    expected = (
        (grpc.StatusCode.UNAVAILABLE, "BACKEND_FAILED")
        if knob == "fail_after"
        else (grpc.StatusCode.INTERNAL, "BACKEND_ERROR")
    )
    assert (error.code(), status_details(error).error_info.reason) == expected
    calls = assembled(chunks)
    assert calls[0][2] == WEATHER_ARGS and calls[1][2] == MAIL_ARGS[:FRAGMENT_CHARS]
    # resuming a failed response replays the chunks and the same failure
    events, again = await drain_error(server.stub.StreamRespond(resume(chunks[0].response_id, 3)))
    assert chunks_of(events) == chunks[3:]
    assert again.code() == error.code() and trailer_sequence(again) == fail_at
    # unary and BUFFERED fail the same way, with nothing delivered
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Respond(
            respond_request("x", tools=tools(), labels=labels(None, 2, **{knob: fail_at}))
        )
    assert raised.value.code() == error.code()
    events, error = await drain_error(
        server.stub.StreamRespond(
            sim_request(
                text_tokens=2, knobs={knob: fail_at}, delivery_mode=pb.DELIVERY_MODE_BUFFERED
            )
        )
    )
    assert chunks_of(events) == []
    assert trailer_sequence(error) == 0


# ----- (6) BUFFERED and AUTO -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "max_tokens", "knobs"),
    [
        (pb.DELIVERY_MODE_BUFFERED, 0, {"inter_token_ms": 2}),
        (pb.DELIVERY_MODE_AUTO, 30, {"inter_token_ms": 5}),  # short by max_tokens
        (pb.DELIVERY_MODE_AUTO, 0, {}),  # finished inside the buffering window
    ],
    ids=["buffered", "auto-short-max-tokens", "auto-window"],
)
async def test_buffered_and_short_auto_send_the_text_then_whole_calls(
    server: RunningServer, mode: int, max_tokens: int, knobs: dict[str, object]
) -> None:
    request = sim_request(
        text_tokens=3, knobs=knobs, cap=1, delivery_mode=mode, params=_max(max_tokens)
    )
    request.resumable = True
    events = await collect(server.stub.StreamRespond(request))
    chunks, completed = chunks_of(events), completed_of(events)
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    check_stream(chunks, completed)
    check_script(completed)
    assert len(chunks) == 3
    assert not chunks[0].HasField("tool_call") and chunks[0].text == completed.final_text
    text_bytes = len(completed.final_text.encode())
    for index, (chunk, arguments) in enumerate(
        zip(chunks[1:], [WEATHER_ARGS, MAIL_ARGS], strict=True)
    ):
        delta = chunk.tool_call
        assert (delta.index, delta.arguments, delta.arguments_offset) == (index, arguments, 0)
        assert delta.id and delta.name and chunk.text_offset == text_bytes
    assert sum(c.token_count for c in chunks) == completed.usage.completion_tokens
    for after in (1, 2):
        replay = await collect(server.stub.StreamRespond(resume(completed.response_id, after)))
        assert chunks_of(replay) == chunks[after:]
        assert completed_of(replay).verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_a_long_auto_answer_streams_its_fragments(server: RunningServer) -> None:
    events = await collect(
        server.stub.StreamRespond(
            sim_request(
                text_tokens=2, knobs={"inter_token_ms": 8}, delivery_mode=pb.DELIVERY_MODE_AUTO
            )
        )
    )
    chunks, completed = chunks_of(events), completed_of(events)
    assert completed.delivery_mode == pb.DELIVERY_MODE_STREAM
    check_stream(chunks, completed)
    assert len(chunks) == 2 + fragments_of(WEATHER_ARGS) + fragments_of(MAIL_ARGS)


async def test_buffered_calls_only_have_no_empty_text_chunk(server: RunningServer) -> None:
    events = await collect(
        server.stub.StreamRespond(sim_request(delivery_mode=pb.DELIVERY_MODE_BUFFERED))
    )
    chunks, completed = chunks_of(events), completed_of(events)
    check_stream(chunks, completed)
    assert [c.tool_call.index for c in chunks] == [0, 1]
    assert completed.final_text == ""


# ----- (7) unary Respond ---------------------------------------------------------


async def test_unary_respond_carries_text_and_calls(server: RunningServer) -> None:
    answer = await server.stub.Respond(
        respond_request("x", tools=tools(), labels=labels(text_tokens=4))
    )
    completed = answer.completed
    check_script(completed)
    assert completed.final_text and completed.chunk_count == completed.last_sequence == 0
    assert completed.final_sha256 == hashlib.sha256(completed.final_text.encode()).hexdigest()
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.verification.checks_passed
    assert completed.usage.completion_tokens == 4 + fragments_of(WEATHER_ARGS) + fragments_of(
        MAIL_ARGS
    )


# ----- (8) governance blocking on an argument value ------------------------------

POLICY_YAML = """
id: tool-faults
version: "3"
refusal_text: "Blocked by tool policy."
block:
  - id: codename
    terms: ["project nightingale"]
  - id: final-check
    scope: final
    pattern: '(?i)launch codes'
"""

BLOCKED_ARGS = '{"to": "ops", "body": "status of the project nightingale rollout, please"}'


@pytest.fixture
async def governed(start_server: StartServer, tmp_path: Path) -> RunningServer:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML)
    return await start_server(policy=str(path))


def assert_blocked(completed: pb.Completed) -> None:
    assert completed.finish_reason == pb.FINISH_REASON_POLICY_BLOCKED
    assert completed.verdict == pb.VERDICT_BLOCKED
    assert list(completed.tool_calls) == []
    assert completed.final_text == "Blocked by tool policy."


@pytest.mark.parametrize("text_tokens", [0, 3])
async def test_a_block_inside_streamed_arguments_retracts_from_the_first_fragment(
    governed: RunningServer, text_tokens: int
) -> None:
    calls = [
        {"name": "get_weather", "arguments": WEATHER_ARGS},
        {"name": "send_mail", "arguments": BLOCKED_ARGS},
    ]
    events = await collect(
        governed.stub.StreamRespond(
            sim_request(calls, text_tokens=text_tokens, knobs={"inter_token_ms": 1}, resumable=True)
        )
    )
    chunks, completed = chunks_of(events), completed_of(events)
    assert_blocked(completed)
    sent = assembled(chunks)
    assert sent[1][2], "some of the blocked call went out before the term formed"
    assert all("nightingale" not in c.tool_call.arguments for c in chunks)
    first_fragment = next(c.sequence for c in chunks if c.HasField("tool_call"))
    verification = completed.verification
    assert verification.status == pb.VERIFICATION_STATUS_DIVERGED
    assert 1 <= verification.retract_from_sequence <= first_fragment
    assert completed.last_sequence == len(chunks)
    # generation stopped when the block was decided
    assert governed.simulator.stats.finished == 0
    # a resume from anywhere, inside the blocked call included, states the same retraction
    for after in range(len(chunks) + 1):
        replay = await collect(governed.stub.StreamRespond(resume(completed.response_id, after)))
        assert chunks_of(replay) == chunks[after:]
        again = completed_of(replay)
        assert again.verification.status == verification.status, after
        assert again.verification.retract_from_sequence == verification.retract_from_sequence
        assert list(again.tool_calls) == []


@pytest.mark.parametrize("mode", [pb.DELIVERY_MODE_BUFFERED, "unary"])
async def test_a_blocked_call_is_never_delivered_whole(governed: RunningServer, mode: Any) -> None:
    calls = [{"name": "send_mail", "arguments": BLOCKED_ARGS}]
    if mode == "unary":
        completed = (
            await governed.stub.Respond(respond_request("x", tools=tools(), labels=labels(calls)))
        ).completed
    else:
        events = await collect(
            governed.stub.StreamRespond(sim_request(calls, text_tokens=2, delivery_mode=mode))
        )
        chunks, completed = chunks_of(events), completed_of(events)
        assert [c.text for c in chunks] == ["Blocked by tool policy."]
        assert not any(c.HasField("tool_call") for c in chunks)
    assert_blocked(completed)
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_a_final_scope_block_on_arguments_drops_the_calls(governed: RunningServer) -> None:
    calls = [{"name": "send_mail", "arguments": '{"body": "here are the launch codes"}'}]
    completed = completed_of(await collect(governed.stub.StreamRespond(sim_request(calls))))
    assert_blocked(completed)
    assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
    assert completed.verification.retract_from_sequence == 1


@pytest.mark.parametrize(
    "mode",
    [pb.DELIVERY_MODE_STREAM, pb.DELIVERY_MODE_BUFFERED, "unary"],
    ids=["stream", "buffered", "unary"],
)
async def test_a_blocked_text_drops_the_calls_too(governed: RunningServer, mode: Any) -> None:
    """The text is blocked by a whole-text rule after clean calls were
    released: the refusal stands for the whole answer, calls included."""
    prompt = "the launch codes are"
    if mode == "unary":
        completed = (
            await governed.stub.Respond(
                respond_request(prompt, model="echo", tools=tools(), labels=labels())
            )
        ).completed
        assert_blocked(completed)
        return
    events = await collect(
        governed.stub.StreamRespond(
            sim_request(
                model="echo",
                messages=[pb.ChatMessage(role=pb.ROLE_USER, content=prompt)],
                delivery_mode=mode,
            )
        )
    )
    chunks, completed = chunks_of(events), completed_of(events)
    assert_blocked(completed)
    if mode == pb.DELIVERY_MODE_BUFFERED:
        assert [c.text for c in chunks] == ["Blocked by tool policy."]
    else:
        assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
        assert completed.verification.retract_from_sequence == 1


# ----- (9) omit_final_text -------------------------------------------------------


async def test_omit_final_text_keeps_the_calls(server: RunningServer) -> None:
    events = await collect(
        server.stub.StreamRespond(sim_request(text_tokens=3, omit_final_text=True))
    )
    completed = completed_of(events)
    check_stream(chunks_of(events), completed, omitted=True)
    check_script(completed)


async def test_omit_final_text_with_a_blocked_call_still_sends_the_refusal(
    governed: RunningServer,
) -> None:
    calls = [{"name": "send_mail", "arguments": BLOCKED_ARGS}]
    events = await collect(governed.stub.StreamRespond(sim_request(calls, omit_final_text=True)))
    completed = completed_of(events)
    assert_blocked(completed)  # DIVERGED: the caller needs the final payload
    assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED


# ----- (10) an upstream interleaving calls, text after a call --------------------


def tool_delta(index: int, arguments: str, call_id: str = "", name: str = "") -> str:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        fragment.update(id=call_id, type="function")
        fragment["function"]["name"] = name
    return delta_event({"tool_calls": [fragment]})


INTERLEAVED = [
    delta_event({"role": "assistant", "content": "Checking both. "}),
    tool_delta(3, '{"ci', "call_b3", "get_weather"),
    tool_delta(1, "", "call_a1", "send_mail"),
    tool_delta(1, '{"to": '),
    tool_delta(3, 'ty": "Bergen"'),
    tool_delta(1, '"ops ✓"'),
    delta_event({"content": "Un instant ✓ "}),
    tool_delta(3, ', "days": 2}'),
    tool_delta(1, "}"),
    delta_event({"content": "done."}),
    delta_event({}, "tool_calls"),
    "data: [DONE]\n\n",
]


async def interleaved_server(start_server: StartServer, upstream: Any) -> RunningServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, INTERLEAVED)

    up = await upstream(handler)
    return await start_server(upstreams=(route(up.url),))


def upstream_request(**fields: Any) -> pb.StreamRespondRequest:
    fields.setdefault("tools", tools())
    fields.setdefault("chunking", pb.Chunking(max_tokens_per_chunk=1))
    return stream_request("Weather and mail", model="up-model", **fields)


EXPECTED_CALLS = [
    ("call_b3", "get_weather", '{"city": "Bergen", "days": 2}'),
    ("call_a1", "send_mail", '{"to": "ops ✓"}'),
]


async def test_interleaved_calls_are_renumbered_and_text_continues_after_them(
    start_server: StartServer, upstream: Any
) -> None:
    running = await interleaved_server(start_server, upstream)
    events = await collect(running.stub.StreamRespond(upstream_request(resumable=True)))
    chunks, completed = chunks_of(events), completed_of(events)
    calls = check_stream(chunks, completed)
    assert [calls[i] for i in range(2)] == EXPECTED_CALLS
    assert completed.final_text == "Checking both. Un instant ✓ done."
    assert completed.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    # the calls' fragments really interleave on the wire, and text follows them
    order = [c.tool_call.index if c.HasField("tool_call") else "t" for c in chunks]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)
    assert order[-1] == "t"
    # a resume between the two calls' fragments still verifies
    middle = order.index(1) + 1
    replay = await collect(running.stub.StreamRespond(resume(completed.response_id, middle)))
    assert chunks_of(replay) == chunks[middle:]
    assert completed_of(replay).verification.status == pb.VERIFICATION_STATUS_VERIFIED


@pytest.mark.parametrize("mode", [pb.DELIVERY_MODE_BUFFERED, "unary"])
async def test_interleaved_calls_whole(start_server: StartServer, upstream: Any, mode: Any) -> None:
    running = await interleaved_server(start_server, upstream)
    if mode == "unary":
        completed = (
            await running.stub.Respond(
                respond_request("Weather and mail", model="up-model", tools=tools())
            )
        ).completed
    else:
        events = await collect(running.stub.StreamRespond(upstream_request(delivery_mode=mode)))
        chunks, completed = chunks_of(events), completed_of(events)
        check_stream(chunks, completed)
        assert len(chunks) == 3
    assert [(c.id, c.name, c.arguments) for c in completed.tool_calls] == EXPECTED_CALLS
    assert completed.final_text == "Checking both. Un instant ✓ done."
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


# ----- helpers -------------------------------------------------------------------


def _seconds(value: float) -> Any:
    from google.protobuf import duration_pb2

    nanos = int(value * 1e9)
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _max(tokens: int) -> pb.GenerationParams:
    return pb.GenerationParams(max_tokens=tokens)


async def test_an_upstream_dying_mid_call_never_claims_success(
    start_server: StartServer, upstream: Any
) -> None:
    events = [
        delta_event({"role": "assistant", "content": "Sure. "}),
        tool_delta(0, '{"city"', "call_x", "get_weather"),
        tool_delta(0, ': "Os'),
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await sse(request, events)
        request.transport.close()  # type: ignore[union-attr]  # the upstream dies mid-call
        return response

    up = await upstream(handler)
    running = await start_server(upstreams=(route(up.url),))
    received, error = await drain_error(
        running.stub.StreamRespond(upstream_request(resumable=True))
    )
    chunks = chunks_of(received)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert status_details(error).error_info.reason == "UPSTREAM_FAILED_MID_STREAM"
    assert trailer_sequence(error) == len(chunks) == 3
    assert assembled(chunks) == {0: ("call_x", "get_weather", '{"city": "Os')}
    replayed, again = await drain_error(
        running.stub.StreamRespond(resume(chunks[0].response_id, 2))
    )
    assert chunks_of(replayed) == chunks[2:]
    assert again.code() == error.code() and trailer_sequence(again) == 3
    assert len(up.requests) == 1  # no silent retry after a fragment went out


async def test_arguments_before_the_name_wait_for_it(
    start_server: StartServer, upstream: Any
) -> None:
    """Some upstreams name the function after its first arguments, or send a
    second call's name before the first's: the first fragment of each call
    still carries its id and name, and calls are numbered as they were named."""
    events = [
        delta_event(
            {"tool_calls": [{"index": 5, "id": "call_late", "function": {"arguments": '{"ci'}}]}
        ),
        tool_delta(2, '{"to": "x"}', "call_early", "send_mail"),
        delta_event({"tool_calls": [{"index": 5, "function": {"name": "get_weather"}}]}),
        tool_delta(5, 'ty": "Oslo"}'),
        delta_event({}, "tool_calls"),
        "data: [DONE]\n\n",
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, events)

    up = await upstream(handler)
    running = await start_server(upstreams=(route(up.url),))
    got = await collect(running.stub.StreamRespond(upstream_request()))
    chunks, completed = chunks_of(got), completed_of(got)
    calls = check_stream(chunks, completed)
    assert calls == {
        0: ("call_early", "send_mail", '{"to": "x"}'),
        1: ("call_late", "get_weather", '{"city": "Oslo"}'),
    }
    assert completed.finish_reason == pb.FINISH_REASON_TOOL_CALLS
