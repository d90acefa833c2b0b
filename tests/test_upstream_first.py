"""A call's upstream request leaves before its bookkeeping, when nothing needs that first.

A response that no retry can attach to (no caller request id) and no caller
can resume is needed by no store before it runs, so tokenwire sends the
upstream request first and registers the response while the upstream
works (docs/performance.md, the per-call floor). A keyed or resumable
response is registered first: a retry must find it before anything reaches
the upstream twice. Each test holds the store's registration until the
upstream has (or has not) seen the request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from aiohttp import web

from tests.conftest import (
    RunningServer,
    StartServer,
    chunks_of,
    collect,
    completed_of,
    stream_request,
)
from tests.test_openai_upstream import chunk_event, request_for, route, sse
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.delivery.response import LiveResponse
from tokenwire_server.servicer import RespondServicer

ANSWER = ["one", " two", " three"]


async def answer(request: web.Request) -> web.StreamResponse:
    return await sse(request, [*(chunk_event(t) for t in ANSWER), chunk_event(None, "stop")])


def hold_registration(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, may_register: asyncio.Event
) -> None:
    """The store registers a response only once `may_register` is set."""
    store = server.server.store
    register = store.register

    async def held(*args: Any, **kwargs: Any) -> Any:
        await may_register.wait()
        return await register(*args, **kwargs)

    monkeypatch.setattr(store, "register", held)


async def started(
    start_server: StartServer, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[RunningServer, asyncio.Event, asyncio.Event]:
    """A server whose registrations wait until the upstream has a request; the
    event that lets them go on, and one set when the upstream got a request."""
    may_register, seen = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.set()
        may_register.set()
        return await answer(request)

    up = await upstream(handler)
    server = await start_server(upstreams=(route(up.url),))
    hold_registration(server, monkeypatch, may_register)
    return server, may_register, seen


async def test_a_stream_without_a_request_id_reaches_the_upstream_before_it_is_registered(
    start_server: StartServer, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, seen = await started(start_server, upstream, monkeypatch)
    async with asyncio.timeout(10):  # the old order waits here for ever
        events = await collect(server.stub.StreamRespond(request_for()))
    assert seen.is_set()
    assert [c.text for c in chunks_of(events)] == ANSWER
    completed = completed_of(events)
    assert completed.final_text == "".join(ANSWER)
    # Registered all the same: Cancel finds it by id, and it is over.
    cancelled = await server.stub.Cancel(pb.CancelRequest(response_id=completed.response_id))
    assert cancelled.response_id == completed.response_id
    assert not cancelled.was_running and cancelled.last_sequence == len(ANSWER)


async def test_a_unary_call_without_a_request_id_does_the_same(
    start_server: StartServer, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, _ = await started(start_server, upstream, monkeypatch)
    async with asyncio.timeout(10):
        reply = await server.stub.Respond(
            pb.RespondRequest(model="up-model", messages=request_for().messages)
        )
    assert reply.completed.final_text == "".join(ANSWER)


@pytest.mark.parametrize(
    "fields", [{"request_id": "retry-me-1"}, {"resumable": True}], ids=["request id", "resumable"]
)
async def test_a_response_a_retry_or_resume_may_need_is_registered_first(
    start_server: StartServer,
    upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, Any],
) -> None:
    server, may_register, seen = await started(start_server, upstream, monkeypatch)
    call = server.stub.StreamRespond(request_for(**fields))
    reading = asyncio.ensure_future(collect(call))
    # The upstream never sees a request while registration is held...
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await seen.wait()
    assert not reading.done()
    may_register.set()  # ...and answers once the response is registered.
    async with asyncio.timeout(10):
        events = await reading
    assert completed_of(events).final_text == "".join(ANSWER)


async def endless_upstream(upstream: Any) -> tuple[Any, asyncio.Event, asyncio.Event]:
    """An upstream that streams until the client hangs up; events set when a
    request arrived and when its client went away."""
    arrived, disconnected = asyncio.Event(), asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        arrived.set()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(chunk_event("x").encode())
                await asyncio.sleep(0.01)
        except BaseException:
            disconnected.set()
            raise

    return await upstream(endless), arrived, disconnected


async def test_a_caller_gone_while_the_response_registers_stops_the_upstream(
    start_server: StartServer, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    up, arrived, disconnected = await endless_upstream(upstream)
    server = await start_server(upstreams=(route(up.url),))
    hold_registration(server, monkeypatch, asyncio.Event())  # never set
    call = server.stub.StreamRespond(request_for())
    reading = asyncio.ensure_future(collect(call))
    async with asyncio.timeout(10):
        await arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await disconnected.wait()  # the generation was stopped, not left running
    monkeypatch.undo()
    events = await collect(server.stub.StreamRespond(stream_request()))  # still serving
    assert completed_of(events).final_text


async def test_a_failure_after_registration_stops_the_upstream_and_ends_the_response(
    start_server: StartServer, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while the call's facts are reported (after the response is in the
    store) fails the call, stops the generation and ends the response in the
    store, which packs it like any ended response instead of keeping it live."""
    up, arrived, disconnected = await endless_upstream(upstream)
    server = await start_server(upstreams=(route(up.url),))
    reported: list[tuple[LiveResponse, asyncio.Task[None]]] = []

    def broken(self: RespondServicer, call: Any, parsed: Any, policy: Any, response: Any) -> None:
        reported.append((response, response.task))
        raise RuntimeError("a bug in a stage's on_facts")

    monkeypatch.setattr(RespondServicer, "_report", broken)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(server.stub.StreamRespond(request_for()))
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    ((response, generation),) = reported
    async with asyncio.timeout(10):
        await asyncio.wait({generation})
        if arrived.is_set():  # the upstream may see the request and its end at once
            await disconnected.wait()
    store = server.server.store
    assert response.response_id in store and store.is_packed(response.response_id)
    monkeypatch.undo()
    events = await collect(server.stub.StreamRespond(stream_request()))  # still serving
    assert completed_of(events).final_text
