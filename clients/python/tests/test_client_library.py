"""The client library against a fake RespondService: checks, fail-over between
addresses, resume on the next one and its time to first token."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from fake_respond import FakeServer, answer, chunks, fail, free_port

from tokenwire import AsyncClient, Chunk, Client, Unavailable
from tokenwire.v1 import respond_pb2 as pb

PARTS = ["The ", "quick ", "brown ", "fox"]


def test_a_stream_is_checked_and_reassembled(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        events = list(client.stream("q", mode="stream"))
    assert [e.text for e in events if isinstance(e, Chunk)] == ["hello ", "world"]
    result = events[-1].result  # type: ignore[union-attr]
    assert result.verified and result.text == "hello world"
    assert client.observed.ordering_violations == 0 and client.observed.stalls == 0


def test_an_address_that_refuses_is_skipped(fake: FakeServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with Client(f"{dead}, {fake.address}", timeout=10) as client:
        assert client.targets == [dead, fake.address]
        assert client.stream("q").collect().text == "hello world"
        assert client.respond("unary").text == "unary"  # sticks to the one that answered
        assert client.cancel_response("rsp_x")
    assert len(fake.servicer.requests) == 1
    with Client([dead], timeout=5) as client, pytest.raises(Unavailable):
        client.stream("q").collect()


def ends_after_two(message: str, **error: Any):
    """A replica's script: two chunks, then UNAVAILABLE (with `reason`, tokenwire's ErrorInfo)."""

    def script(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        yield from chunks(PARTS)[:2]
        fail(context, grpc.StatusCode.UNAVAILABLE, message, **error)

    return script


def takes_over_after_two(delay: float = 0.0):
    """The next replica's script: a resume after sequence 2, answered after `delay`."""

    def script(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        assert request.resume.response_id == "rsp_fake" and request.resume.after_sequence == 2
        time.sleep(delay)
        yield from answer(PARTS, first=3)

    return script


def test_a_dropped_stream_resumes_on_the_next_address(fake: FakeServer, fake_b: FakeServer) -> None:
    # No ErrorInfo: a dropped connection.
    fake.script, fake_b.script = ends_after_two("connection reset"), takes_over_after_two(0.05)
    with Client(f"{fake.address},{fake_b.address}") as client:
        stream = client.stream("q", resumable=True)
        result = stream.collect()
    assert result.verified and result.text == "".join(PARTS)
    assert stream.resumes == 1 and len(fake_b.servicer.requests) == 1
    assert stream.resumed_time_to_first_token is not None
    assert 0.05 <= stream.resumed_time_to_first_token < 5


def test_a_replica_stopping_under_a_shared_stream_resumes_it_on_the_next_address(
    fake: FakeServer, fake_b: FakeServer
) -> None:
    """UNAVAILABLE SERVER_STOPPING is tokenwire's own status, yet it ends the
    call, not the response (shared through Redis, it goes on): the client
    resumes elsewhere. Any other tokenwire UNAVAILABLE is the response's end."""

    stopping = ends_after_two(
        "this replica is stopping",
        reason="SERVER_STOPPING",
        metadata={"lastSequence": "2", "responseId": "rsp_fake"},
    )
    fake.script, fake_b.script = stopping, takes_over_after_two()
    with Client(f"{fake.address},{fake_b.address}") as client:
        stream = client.stream("q", resumable=True)
        result = stream.collect()
    assert result.verified and result.text == "".join(PARTS)
    assert stream.resumes == 1 and len(fake_b.servicer.requests) == 1

    fake.script = ends_after_two("backend down", reason="BACKEND_UNAVAILABLE")
    fake_b.servicer.requests.clear()
    with Client(f"{fake.address},{fake_b.address}") as client:
        failed = client.stream("q", resumable=True)
        with pytest.raises(Unavailable) as raised:
            failed.collect()
    assert raised.value.reason == "BACKEND_UNAVAILABLE" and failed.resumes == 0
    assert fake_b.servicer.requests == []


def test_the_async_client_fails_over_too(fake: FakeServer) -> None:
    async def run() -> str:
        async with AsyncClient([f"127.0.0.1:{free_port()}", fake.address]) as client:
            result = await client.stream("q").collect()
            unary = await client.respond("u")
        return result.text + unary.text

    assert asyncio.run(run()) == "hello worldu"


def test_one_string_grpc_uri_is_not_split() -> None:
    from tokenwire.client import split_targets

    assert split_targets("ipv4:127.0.0.1:1,127.0.0.1:2") == ["ipv4:127.0.0.1:1,127.0.0.1:2"]
    assert split_targets(" a:1 ,b:2,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        split_targets(" , ")
