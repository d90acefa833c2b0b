"""Client-side counters: ordering violations and stalls a client observed, per
client, as plain ints (`client.observed`) and through the `on_observation` hook."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from fake_respond import RESPONSE_ID, FakeServer, answer, chunk, chunks, completed

from tokenwire import AsyncClient, Client, Observation, Observed, ProtocolError
from tokenwire.observed import COUNTERS
from tokenwire.v1 import respond_pb2 as pb

PARTS = ["one ", "two ", "three ", "four"]
Script = list[pb.StreamRespondResponse]


def offsets(parts: list[str]) -> list[int]:
    result, at = [], 0
    for part in parts:
        result.append(at)
        at += len(part.encode())
    return result


AT = offsets(PARTS)

BROKEN: dict[str, Script] = {
    "sequence_gap": [chunk(1, PARTS[0], AT[0]), chunk(3, PARTS[2], AT[2])],
    "sequence_repeat": [chunk(1, PARTS[0], AT[0]), chunk(2, PARTS[1], AT[1]),
                        chunk(2, PARTS[1], AT[1])],
    "offset_mismatch": [chunk(1, PARTS[0], AT[0]), chunk(2, PARTS[1], AT[1] + 1)],
    "event_after_completed": [*answer(PARTS), chunk(5, "more", AT[3] + 4)],
    # Completed claiming chunks that never came is a gap at the end.
    "completed_names_more": [*chunks(PARTS)[:3], completed(PARTS)],
}  # fmt: skip
KIND = {case: case for case in BROKEN} | {"completed_names_more": "sequence_gap"}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_ordering_violation_is_counted_and_raised(fake: FakeServer, case: str) -> None:
    fake.script = lambda request, context: BROKEN[case]
    heard: list[Observation] = []
    with Client(fake.address, on_observation=heard.append) as client:
        with pytest.raises(ProtocolError):
            client.stream("q", mode="stream").collect()
        assert client.observed == Observed(**{COUNTERS[KIND[case]]: 1})
        assert client.observed.ordering_violations == 1 and client.observed.stalls == 0
    [observation] = heard
    assert observation.kind == KIND[case]
    assert observation.response_id == RESPONSE_ID
    assert observation.detail


def test_counts_add_up_per_client(fake: FakeServer) -> None:
    fake.script = lambda request, context: BROKEN["sequence_gap"]
    with Client(fake.address) as one, Client(fake.address) as other:
        for _ in range(3):
            with pytest.raises(ProtocolError):
                one.stream("q").collect()
        fake.script = lambda request, context: answer(PARTS)
        assert other.stream("q").collect().verified
        assert one.observed.sequence_gaps == 3 and one.observed.ordering_violations == 3
        assert other.observed == Observed()
        assert one.observed.as_dict() == {
            "sequence_gaps": 3,
            "sequence_repeats": 0,
            "offset_mismatches": 0,
            "events_after_completed": 0,
            "stalls": 0,
        }


def test_the_async_client_counts_too(fake: FakeServer) -> None:
    fake.script = lambda request, context: BROKEN["offset_mismatch"]
    heard: list[Observation] = []

    async def run() -> Observed:
        async with AsyncClient(fake.address, on_observation=heard.append) as client:
            with pytest.raises(ProtocolError):
                await client.stream("q").collect()
            return client.observed

    assert asyncio.run(run()) == Observed(offset_mismatches=1)
    assert [o.kind for o in heard] == ["offset_mismatch"]


def stalling(pause: float):
    """Two chunks, a silence of `pause` seconds (not even a heartbeat), the rest."""

    def script(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        events = answer(PARTS)
        yield from events[:2]
        time.sleep(pause)
        yield from events[2:]

    return script


def test_a_silent_stream_counts_one_stall_as_it_happens(fake: FakeServer) -> None:
    fake.script = stalling(2.0)
    heard: list[tuple[Observation, float]] = []
    started = time.monotonic()

    def hook(observation: Observation) -> None:
        heard.append((observation, time.monotonic() - started))

    with Client(fake.address, stall_timeout=0.3, on_observation=hook) as client:
        result = client.stream("q").collect()
        assert result.verified  # a stall is counted, not fatal
        assert client.observed == Observed(stalls=1)  # once per silence, however long
    [(observation, when)] = heard
    assert observation.kind == "stall" and observation.response_id == RESPONSE_ID
    assert observation.last_sequence == 2
    assert when < 1.9, "the stall is seen while the silence lasts, not at its end"


def test_the_async_client_sees_a_stall_while_it_lasts(fake: FakeServer) -> None:
    fake.script = stalling(1.5)
    seen_during: list[int] = []

    async def run() -> Observed:
        async with AsyncClient(fake.address, stall_timeout=0.2) as client:
            stream = client.stream("q")
            async for _ in stream:
                if stream.last_sequence == 2 and not seen_during:
                    await asyncio.sleep(0.8)  # the loop is free: the watch runs
                    seen_during.append(client.observed.stalls)
            return client.observed

    assert asyncio.run(run()) == Observed(stalls=1)
    assert seen_during == [1]


def test_a_steady_stream_or_no_stall_timeout_counts_no_stall(fake: FakeServer) -> None:
    def steady(request: pb.StreamRespondRequest, context: grpc.ServicerContext):
        for event in answer(PARTS):
            time.sleep(0.05)
            yield event

    fake.script = steady
    with Client(fake.address, stall_timeout=1.0) as client:  # 20 times the gaps: load-proof
        client.stream("q").collect()
        assert client.observed.stalls == 0
    fake.script = stalling(0.6)
    with Client(fake.address, stall_timeout=None) as client:
        client.stream("q").collect()
        assert client.observed.stalls == 0
    with pytest.raises(ValueError):
        Client(fake.address, stall_timeout=0)


def test_a_failing_hook_breaks_nothing(fake: FakeServer) -> None:
    def broken_hook(observation: Observation) -> None:
        raise RuntimeError("exporter down")

    fake.script = lambda request, context: BROKEN["sequence_repeat"]
    with Client(fake.address, on_observation=broken_hook) as client:
        with pytest.raises(ProtocolError):  # the violation, not the hook's error
            client.stream("q").collect()
        assert client.observed.sequence_repeats == 1


def test_the_stall_watch_is_one_thread_per_client(fake: FakeServer) -> None:
    fake.script = stalling(0.1)
    with Client(fake.address, stall_timeout=5) as client:
        for _ in range(5):
            client.stream("q").collect()
        names = [t.name for t in threading.enumerate()]
        assert names.count("tokenwire-stall-watch") == 1
