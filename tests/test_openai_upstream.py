"""The OpenAI-compatible backend against a scripted upstream: a real aiohttp HTTP server.

Each test scripts what the upstream sends (SSE framing edge cases, errors,
stalls) and drives tokenwire through its gRPC surface.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import (
    StartServer,
    chunks_of,
    collect,
    completed_of,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.backends.sse import SSEDecoder
from tokenwire_server.config import UpstreamConfig


def chunk_event(content: str | None = None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    event = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return "data: " + json.dumps(event) + "\n\n"


def route(url: str, name: str = "up", **options: Any) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        base_url=url,
        model="up-model",
        upstream_model="m1",
        retry_backoff=0.01,
        **options,
    )


async def sse(request: web.Request, body: list[str], delay: float = 0) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for piece in body:
        await response.write(piece.encode())
        if delay:
            await asyncio.sleep(delay)
    return response


def in_one_read(tokens: list[str]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler that sends the whole answer, `[DONE]` included, in one write."""

    async def handler(request: web.Request) -> web.StreamResponse:
        burst = "".join(chunk_event(t) for t in tokens) + chunk_event(None, "stop")
        return await sse(request, [burst + "data: [DONE]\n\n"])

    return handler


def request_for(model: str = "up-model", **fields: Any) -> pb.StreamRespondRequest:
    return stream_request(model=model, chunking=pb.Chunking(max_tokens_per_chunk=1), **fields)


async def test_streams_through_sse_framing_edge_cases(start_server: StartServer, upstream) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        events = [
            ": keep-alive comment\n\n",
            chunk_event("Hel"),
            "\n",  # a stray blank line
            # one event split across network writes, mid-line
            'data: {"choices":[{"delta":{"content":"lo, "},',
            '"finish_reason":null}]}\n\n',
            "data:" + json.dumps({"choices": [{"delta": {"content": "wörld"}}]}) + "\n\n",
            chunk_event(None, "stop"),
            "data: "
            + json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}})
            + "\n\n",
            "data: [DONE]\n\n",
        ]
        return await sse(request, events)

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url),))
    events = await collect(server.stub.StreamRespond(request_for()))
    completed = completed_of(events)
    assert [c.text for c in chunks_of(events)] == ["Hel", "lo, ", "wörld"]
    assert completed.final_text == "Hello, wörld"
    assert (completed.usage.prompt_tokens, completed.usage.completion_tokens) == (11, 3)
    assert completed.serving.backend == "up"
    assert completed.serving.path == pb.SERVING_PATH_STREAMING
    assert completed.serving.attempts == 1
    assert completed.model == "up-model" and completed.model_version == "m1"
    sent = up.requests[0]
    assert sent["model"] == "m1" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "user", "content": "Tell me about streams"}]


async def test_usage_is_counted_when_the_upstream_sends_none(
    start_server: StartServer, upstream
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, [chunk_event("a"), chunk_event("b"), chunk_event(None, "length")])

    up = await upstream(handler)  # no [DONE]: the finish_reason ends the stream
    server = await start_server(upstreams=(route(up.url),))
    completed = completed_of(await collect(server.stub.StreamRespond(request_for())))
    assert completed.final_text == "ab"
    assert completed.usage.completion_tokens == 2
    assert completed.usage.prompt_tokens > 0
    assert completed.finish_reason == pb.FINISH_REASON_LENGTH


async def test_the_first_token_leaves_before_the_rest_of_a_burst(
    start_server: StartServer, upstream
) -> None:
    """A whole answer in one network read: the first token's chunk leaves
    alone, before the read's other 199 events are even parsed, instead of
    waiting for all of them and leaving coalesced with them."""
    words = [f" w{i}" for i in range(200)]
    up = await upstream(in_one_read(words))
    server = await start_server(upstreams=(route(up.url),))
    request = stream_request(model="up-model", chunking=pb.Chunking(max_tokens_per_chunk=1024))
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    assert (chunks[0].text, chunks[0].token_count) == (" w0", 1)
    assert "".join(c.text for c in chunks) == "".join(words)
    assert sum(c.token_count for c in chunks) == 200
    assert completed_of(events).final_text == "".join(words)


async def test_retries_a_failure_before_the_first_token(
    start_server: StartServer, upstream
) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        return await sse(
            request, [chunk_event("ok"), chunk_event(None, "stop"), "data: [DONE]\n\n"]
        )

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url),))
    completed = completed_of(await collect(server.stub.StreamRespond(request_for())))
    assert completed.final_text == "ok" and completed.serving.attempts == 2
    assert completed.serving.path == pb.SERVING_PATH_STREAMING


async def test_falls_back_to_a_non_streaming_request(start_server: StartServer, upstream) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["stream"]:
            return web.json_response({"error": {"message": "streaming broken"}}, status=500)
        return web.json_response(
            {
                "choices": [
                    {
                        "message": {"role": "assistant", "content": "whole answer"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2},
            }
        )

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url, max_retries=1),))
    completed = completed_of(await collect(server.stub.StreamRespond(request_for())))
    assert completed.final_text == "whole answer"
    assert completed.serving.path == pb.SERVING_PATH_NON_STREAMING
    assert completed.serving.attempts == 3  # two streaming tries, then one non-streaming
    assert completed.usage.completion_tokens == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_falls_back_to_the_next_upstream(start_server: StartServer, upstream) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, [chunk_event("from backup"), chunk_event(None, "stop")])

    backup = await upstream(handler)
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    routes = (
        route(dead, name="primary", max_retries=1, fallback=("backup",)),
        UpstreamConfig(name="backup", base_url=backup.url, model="backup-model"),
    )
    server = await start_server(upstreams=routes)
    completed = completed_of(await collect(server.stub.StreamRespond(request_for())))
    assert completed.final_text == "from backup"
    assert completed.serving.backend == "backup"
    assert completed.serving.attempts == 4  # 2 streaming + 1 non-streaming to primary, 1 backup


async def test_upstream_rejection_is_invalid_argument_with_its_message(
    start_server: StartServer, upstream
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"message": "context length exceeded", "type": "invalid_request_error"}},
            status=400,
        )

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url),))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request_for()))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "UPSTREAM_REJECTED"
    assert "context length exceeded" in details.message


async def test_mid_stream_failure_never_repeats_tokens(start_server: StartServer, upstream) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await sse(request, [chunk_event("one "), chunk_event("two ")])
        request.transport.close()  # type: ignore[union-attr]  # the upstream dies mid-answer
        return response

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url),))
    received: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in server.stub.StreamRespond(request_for()):
            received.append(event)
    assert [c.text for c in chunks_of(received)] == ["one ", "two "]
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "UPSTREAM_FAILED_MID_STREAM"
    assert details.trailers["tokenwire-last-sequence"] == "2"
    assert len(up.requests) == 1  # no silent retry after tokens went out


async def test_client_cancel_closes_the_upstream_stream(
    start_server: StartServer, upstream
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, [chunk_event(f"t{i} ") for i in range(1000)], delay=0.02)

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url),))
    call = server.stub.StreamRespond(request_for())
    await call.read()
    call.cancel()
    await asyncio.wait_for(up.disconnected.wait(), timeout=5)


async def test_deadline_bounds_the_upstream_request(start_server: StartServer, upstream) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(30)  # never sends a token
        return response

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url, max_retries=0),), default_deadline=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request_for()))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(up.disconnected.wait(), timeout=5)


def decode(reads: list[bytes]) -> list[bytes]:
    decoder = SSEDecoder()
    events = [event for read in reads for event in decoder.feed(read)]
    return events + decoder.close()


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    body = (
        b": comment\n\ndata: one\ndata: two\n\nevent: x\ndata:three\n\nid: 7\n\ndata\n\ndata: last"
    )
    assert decode([body]) == [b"one\ntwo", b"three", b"", b"last"]
    assert decode([b"data: a\r\n\r\ndata: b\r\rdata: \xc3\xa9\n\n"]) == [b"a", b"b", b"\xc3\xa9"]


@given(
    events=st.lists(
        st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",))), max_size=6
    ),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_sse_decoder_gives_the_same_events_however_the_reads_are_cut(
    events: list[str], newline: str, cuts: list[int]
) -> None:
    body = "".join(f"data: {e}{newline}{newline}" for e in events).encode()
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    reads = [body[a:b] for a, b in itertools.pairwise(points)]
    assert decode(reads) == [event.encode() for event in events]


async def test_a_burst_of_tokens_in_one_read_keeps_the_chunk_bound(
    start_server: StartServer, upstream
) -> None:
    tokens = [f" t{i}" for i in range(200)]
    up = await upstream(in_one_read(tokens))
    server = await start_server(upstreams=(route(up.url),))
    request = stream_request(model="up-model", chunking=pb.Chunking(max_tokens_per_chunk=4))
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    assert all(0 < c.token_count <= 4 for c in chunks)
    assert sum(c.token_count for c in chunks) == 200
    assert "".join(c.text for c in chunks) == "".join(tokens)
    assert completed_of(events).final_text == "".join(tokens)


async def test_governance_redacts_values_split_inside_and_across_reads(
    start_server: StartServer, upstream
) -> None:
    # One email split over tokens within a read, one split across two reads.
    first = ["Mail ", "jane", ".doe", "@exam", "ple.com", " or ", "ops@", "exa"]
    second = ["mple.org", " key ", "AKIA", "IOSFODNN", "7EXAMPLE", " done."]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(
            request,
            [
                "".join(chunk_event(t) for t in first),
                "".join(chunk_event(t) for t in second) + "data: [DONE]\n\n",
            ],
            delay=0.01,
        )

    up = await upstream(handler)
    server = await start_server(policy="builtin:default", upstreams=(route(up.url),))
    events = await collect(server.stub.StreamRespond(stream_request(model="up-model")))
    streamed = "".join(c.text for c in chunks_of(events))
    completed = completed_of(events)
    for secret in ("jane.doe@example.com", "ops@example.org", "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in streamed and secret not in completed.final_text
    assert streamed == completed.final_text
    assert completed.final_text.count("[EMAIL]") == 2
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert sum(c.token_count for c in chunks_of(events)) == len(first) + len(second)
