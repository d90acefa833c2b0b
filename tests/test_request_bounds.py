"""Every number a request can set is finite and inside a documented range, or
the call is INVALID_ARGUMENT with a BadRequest violation naming the field and
stating the range; the server keeps serving and generates nothing for a
refused call. The ranges come from the tables the server checks against
(`request_bounds`, `KNOBS`), so a new bound cannot go untested."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.conftest import (
    StartServer,
    collect,
    completed_of,
    make_config,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.backends.simulator import KNOB_PREFIX, KNOBS
from tokenwire_server.validation import request_bounds

#: Not a finite number in range in any caller's language.
BAD_NUMBERS = [
    "nan",
    "NaN",
    "inf",
    "-inf",
    "infinity",
    "1e308",
    "-1",
    "1.5e400",
    "",
    " ",
    "ten",
    "0x10",
    "1_0",  # Python's int() reads 10; Go's strconv and JS's Number do not
    " 5",
    "5 ",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() reads 3
    "1" * 40,
]

BOUNDS = request_bounds(make_config())


def knob_cases() -> list[Any]:
    cases = []
    for knob, spec in KNOBS.items():
        if not spec.numeric:  # tool-calls: tests/test_tool_call_backends.py
            continue
        low, high = spec.low, spec.high
        bad = [*BAD_NUMBERS, repr(high + 1), repr(low - 1)]
        if spec.integer:
            bad += ["2.5", "1e3", "+"]
        else:
            bad += [repr(high * 1.0001), ".", "1e", "-0.001"]
        for value in bad:
            cases.append(pytest.param(knob, value, id=f"{knob}={value!r}"))
    return cases


PARAM_CASES = [
    pytest.param({"temperature": float("nan")}, "params.temperature", id="temperature-nan"),
    pytest.param({"temperature": float("inf")}, "params.temperature", id="temperature-inf"),
    pytest.param({"temperature": float("-inf")}, "params.temperature", id="temperature-neg-inf"),
    pytest.param({"temperature": 1e308}, "params.temperature", id="temperature-huge"),
    pytest.param({"temperature": -0.1}, "params.temperature", id="temperature-negative"),
    pytest.param({"temperature": 2.000001}, "params.temperature", id="temperature-over"),
    pytest.param({"top_p": float("nan")}, "params.top_p", id="top_p-nan"),
    pytest.param({"top_p": float("inf")}, "params.top_p", id="top_p-inf"),
    pytest.param({"top_p": 0.0}, "params.top_p", id="top_p-zero"),
    pytest.param({"top_p": -0.5}, "params.top_p", id="top_p-negative"),
    pytest.param({"top_p": 1.0000001}, "params.top_p", id="top_p-over"),
    pytest.param({"top_p": float("-inf")}, "params.top_p", id="top_p-neg-inf"),
    pytest.param({"top_p": 1e308}, "params.top_p", id="top_p-huge"),
    pytest.param({"max_tokens": -1}, "params.max_tokens", id="max_tokens-negative"),
    pytest.param({"max_tokens": -(2**31)}, "params.max_tokens", id="max_tokens-int32-min"),
    pytest.param(
        {"max_tokens": int(BOUNDS["params.max_tokens"].high) + 1},
        "params.max_tokens",
        id="max_tokens-over",
    ),
    pytest.param({"max_tokens": 2**31 - 1}, "params.max_tokens", id="max_tokens-int32-max"),
]

CHUNKING_CASES = [
    pytest.param(pb.Chunking(max_delay=Duration(seconds=-1)), "chunking.max_delay", id="delay-neg"),
    pytest.param(
        pb.Chunking(max_delay=Duration(nanos=-5)), "chunking.max_delay", id="delay-neg-ns"
    ),
    pytest.param(
        pb.Chunking(max_delay=Duration(seconds=10**9)), "chunking.max_delay", id="delay-huge"
    ),
    pytest.param(
        pb.Chunking(max_delay=Duration(seconds=315576000000)),
        "chunking.max_delay",
        id="delay-max-duration",
    ),
    pytest.param(
        pb.Chunking(max_delay=Duration(seconds=-315576000000, nanos=-999999999)),
        "chunking.max_delay",
        id="delay-min-duration",
    ),
    pytest.param(
        # Not a normalised Duration: nanos must stay under one second.
        pb.Chunking(max_delay=Duration(nanos=1_500_000_000)),
        "chunking.max_delay",
        id="delay-nanos-overflow",
    ),
    pytest.param(
        pb.Chunking(max_tokens_per_chunk=-1), "chunking.max_tokens_per_chunk", id="per-chunk-neg"
    ),
    pytest.param(
        pb.Chunking(max_tokens_per_chunk=-(2**31)),
        "chunking.max_tokens_per_chunk",
        id="per-chunk-int32-min",
    ),
    pytest.param(
        pb.Chunking(max_tokens_per_chunk=int(BOUNDS["chunking.max_tokens_per_chunk"].high) + 1),
        "chunking.max_tokens_per_chunk",
        id="per-chunk-over",
    ),
    pytest.param(
        pb.Chunking(max_tokens_per_chunk=2**31 - 1),
        "chunking.max_tokens_per_chunk",
        id="per-chunk-int32-max",
    ),
]


def unary_request(**fields: Any) -> pb.RespondRequest:
    labels = fields.pop("labels", {})
    request = pb.RespondRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")], **fields
    )
    request.labels.update(labels)
    return request


async def expect_invalid(call: Any, field: str, states: str) -> None:
    """INVALID_ARGUMENT whose BadRequest names `field` and says `states` there."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.bad_request is not None
    named = {v.field: v.description for v in details.bad_request.field_violations}
    assert field in named, details
    assert states in named[field], named


async def still_serves(server: Any) -> None:
    """A good call right after a refused one: the refusal left nothing behind."""
    answer = await server.stub.Respond(unary_request(params=pb.GenerationParams(max_tokens=3)))
    assert answer.completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


@pytest.fixture
async def server(start_server: StartServer):
    return await start_server()


@pytest.mark.parametrize(("knob", "value"), knob_cases())
async def test_simulator_knobs_are_bounded(server, knob: str, value: str) -> None:
    low, high = KNOBS[knob].low, KNOBS[knob].high
    labels = {KNOB_PREFIX + knob: value}
    field = f"labels[{KNOB_PREFIX}{knob}]"
    states = f"from {low:g} to {high:g}"
    await expect_invalid(
        collect(server.stub.StreamRespond(stream_request(labels=labels))), field, states
    )
    await expect_invalid(server.stub.Respond(unary_request(labels=labels)), field, states)
    assert server.simulator.stats.started == 0
    await still_serves(server)


async def test_an_unknown_simulator_knob_is_named(server) -> None:
    labels = {KNOB_PREFIX + "inter-token-delay": "5"}
    field = f"labels[{KNOB_PREFIX}inter-token-delay]"
    await expect_invalid(
        collect(server.stub.StreamRespond(stream_request(labels=labels))), field, "inter-token-ms"
    )
    await expect_invalid(server.stub.Respond(unary_request(labels=labels)), field, "answer-tokens")


@pytest.mark.parametrize(("params", "field"), PARAM_CASES)
async def test_generation_parameters_are_bounded(
    server, params: dict[str, Any], field: str
) -> None:
    states = BOUNDS[field].describe()
    request = stream_request(params=pb.GenerationParams(**params))
    await expect_invalid(collect(server.stub.StreamRespond(request)), field, states)
    unary = unary_request(params=pb.GenerationParams(**params))
    await expect_invalid(server.stub.Respond(unary), field, states)
    assert server.simulator.stats.started == 0
    await still_serves(server)


@pytest.mark.parametrize(("chunking", "field"), CHUNKING_CASES)
async def test_chunking_is_bounded(server, chunking: pb.Chunking, field: str) -> None:
    request = stream_request(chunking=chunking)
    await expect_invalid(
        collect(server.stub.StreamRespond(request)), field, BOUNDS[field].describe()
    )
    assert server.simulator.stats.started == 0
    await still_serves(server)


async def test_every_offending_number_is_named_at_once(server) -> None:
    """A request field and a simulator knob wrong together: one round trip names both."""
    request = stream_request(
        params=pb.GenerationParams(temperature=float("nan")),
        chunking=pb.Chunking(max_tokens_per_chunk=-1),
        labels={KNOB_PREFIX + "ttft-ms": "inf", KNOB_PREFIX + "fail-after": "-1"},
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "INVALID_TEMPERATURE"  # the first problem found
    assert details.bad_request is not None
    assert {v.field for v in details.bad_request.field_violations} == {
        "params.temperature",
        "chunking.max_tokens_per_chunk",
        f"labels[{KNOB_PREFIX}ttft-ms]",
        f"labels[{KNOB_PREFIX}fail-after]",
    }


async def test_a_resume_sequence_past_the_end_is_out_of_range(server) -> None:
    """`after_sequence` is a uint32: its range depends on the response, so past
    the end is OUT_OF_RANGE (a sequence that may exist later), with the last one."""
    events = await collect(server.stub.StreamRespond(stream_request()))
    completed = completed_of(events)
    request = pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=completed.response_id, after_sequence=2**32 - 1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.OUT_OF_RANGE, details
    assert details.error_info.metadata["lastSequence"] == str(completed.last_sequence)
    await still_serves(server)


async def test_good_values_at_the_bounds_still_work(server) -> None:
    labels = {
        KNOB_PREFIX + "answer-tokens": "3",
        KNOB_PREFIX + "ttft-ms": "0",
        KNOB_PREFIX + "inter-token-ms": "0.5",
        KNOB_PREFIX + "echo-token-chars": "4096",
        KNOB_PREFIX + "fail-after": "+1000000",
    }
    params = pb.GenerationParams(temperature=2.0, top_p=1.0, max_tokens=4)
    chunking = pb.Chunking(
        max_tokens_per_chunk=int(BOUNDS["chunking.max_tokens_per_chunk"].high),
        max_delay=Duration(seconds=int(BOUNDS["chunking.max_delay"].high)),
    )
    events = await collect(
        server.stub.StreamRespond(stream_request(labels=labels, params=params, chunking=chunking))
    )
    assert completed_of(events).usage.completion_tokens == 3
    low = pb.GenerationParams(temperature=0.0, top_p=1e-9, max_tokens=1)
    answer = await server.stub.Respond(unary_request(params=low, labels={}))
    assert answer.completed.usage.completion_tokens == 1


def test_the_docs_list_every_bound() -> None:
    """docs/request-bounds.md names every field and knob the server bounds."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "request-bounds.md").read_text()
    for field in BOUNDS:
        assert f"`{field}`" in text, field
    for knob, spec in KNOBS.items():
        row = next(line for line in text.splitlines() if f"`{KNOB_PREFIX}{knob}`" in line)
        if spec.numeric:
            assert f"{spec.low:,g}" in row and f"{spec.high:,.0f}" in row, row
