"""Every number a request can set is finite and inside a documented range, or
the call is INVALID_ARGUMENT with a BadRequest violation naming the field; the
server keeps serving and generates nothing for a refused call."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.conftest import StartServer, collect, completed_of, status_details, stream_request
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.backends.simulator import KNOB_PREFIX, KNOBS

BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "1e308", "-1", "1.5e400", "", "ten", "0x10"]


def knob_cases() -> list[Any]:
    cases = []
    for knob, (integer, low, high) in KNOBS.items():
        bad = [*BAD_NUMBERS, repr(high + 1), repr(low - 1)]
        if integer:
            bad.append("2.5")
        for value in bad:
            cases.append(pytest.param(knob, value, id=f"{knob}={value}"))
    return cases


PARAM_CASES = [
    pytest.param({"temperature": float("nan")}, "params.temperature", id="temperature-nan"),
    pytest.param({"temperature": float("inf")}, "params.temperature", id="temperature-inf"),
    pytest.param({"temperature": 1e308}, "params.temperature", id="temperature-huge"),
    pytest.param({"temperature": -0.1}, "params.temperature", id="temperature-negative"),
    pytest.param({"top_p": float("nan")}, "params.top_p", id="top_p-nan"),
    pytest.param({"top_p": 0.0}, "params.top_p", id="top_p-zero"),
    pytest.param({"top_p": float("-inf")}, "params.top_p", id="top_p-neg-inf"),
    pytest.param({"max_tokens": -1}, "params.max_tokens", id="max_tokens-negative"),
    pytest.param({"max_tokens": 2**31 - 1}, "params.max_tokens", id="max_tokens-huge"),
]


async def expect_invalid(call: Any, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.bad_request is not None
    assert field in [v.field for v in details.bad_request.field_violations], details


@pytest.fixture
async def server(start_server: StartServer):
    return await start_server()


@pytest.mark.parametrize(("knob", "value"), knob_cases())
async def test_simulator_knobs_are_bounded(server, knob: str, value: str) -> None:
    labels = {KNOB_PREFIX + knob: value}
    field = f"labels[{KNOB_PREFIX}{knob}]"
    await expect_invalid(collect(server.stub.StreamRespond(stream_request(labels=labels))), field)
    unary = pb.RespondRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
    unary.labels.update(labels)
    await expect_invalid(server.stub.Respond(unary), field)
    assert server.simulator.stats.started == 0


async def test_an_unknown_simulator_knob_is_named(server) -> None:
    labels = {KNOB_PREFIX + "inter-token-delay": "5"}
    await expect_invalid(
        collect(server.stub.StreamRespond(stream_request(labels=labels))),
        f"labels[{KNOB_PREFIX}inter-token-delay]",
    )


@pytest.mark.parametrize(("params", "field"), PARAM_CASES)
async def test_generation_parameters_are_bounded(
    server, params: dict[str, Any], field: str
) -> None:
    request = stream_request(params=pb.GenerationParams(**params))
    await expect_invalid(collect(server.stub.StreamRespond(request)), field)
    unary = pb.RespondRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")],
        params=pb.GenerationParams(**params),
    )
    await expect_invalid(server.stub.Respond(unary), field)


@pytest.mark.parametrize(
    "delay",
    [
        Duration(seconds=-1),
        Duration(nanos=-5),
        Duration(seconds=10**9),
        Duration(seconds=315576000000),
    ],
    ids=["negative", "negative-nanos", "huge", "max-duration"],
)
async def test_chunk_delay_is_bounded(server, delay: Duration) -> None:
    request = stream_request(chunking=pb.Chunking(max_delay=delay))
    await expect_invalid(collect(server.stub.StreamRespond(request)), "chunking.max_delay")


async def test_good_values_at_the_bounds_still_work(server) -> None:
    labels = {
        KNOB_PREFIX + "answer-tokens": "3",
        KNOB_PREFIX + "ttft-ms": "0",
        KNOB_PREFIX + "inter-token-ms": "0.5",
        KNOB_PREFIX + "echo-token-chars": "4096",
    }
    params = pb.GenerationParams(temperature=2.0, top_p=1.0, max_tokens=4)
    events = await collect(server.stub.StreamRespond(stream_request(labels=labels, params=params)))
    assert completed_of(events).usage.completion_tokens == 3
