"""Bad input and failures: precise statuses with google.rpc details; the server keeps serving."""

from __future__ import annotations

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
    user,
)
from tokenwire.v1 import respond_pb2 as pb

BAD_REQUESTS = [
    pytest.param({"messages": []}, "messages", "MESSAGES_EMPTY", id="no-messages"),
    pytest.param(
        {"messages": [pb.ChatMessage(role=pb.ROLE_USER, content="")]},
        "messages[0].content",
        "EMPTY_CONTENT",
        id="empty-content",
    ),
    pytest.param(
        {"messages": [pb.ChatMessage(role=pb.ROLE_UNSPECIFIED, content="hi")]},
        "messages[0].role",
        "INVALID_ROLE",
        id="unspecified-role",
    ),
    pytest.param(
        {"messages": [pb.ChatMessage(role=99, content="hi")]},  # type: ignore[arg-type]
        "messages[0].role",
        "INVALID_ROLE",
        id="unknown-role-value",
    ),
    pytest.param(
        {"params": pb.GenerationParams(max_tokens=100_000)},
        "params.max_tokens",
        "MAX_TOKENS_TOO_LARGE",
        id="max-tokens-over-cap",
    ),
    pytest.param(
        {"params": pb.GenerationParams(max_tokens=-1)},
        "params.max_tokens",
        "INVALID_MAX_TOKENS",
        id="negative-max-tokens",
    ),
    pytest.param(
        {"params": pb.GenerationParams(temperature=3.5)},
        "params.temperature",
        "INVALID_TEMPERATURE",
        id="temperature",
    ),
    pytest.param(
        {"params": pb.GenerationParams(top_p=0.0)}, "params.top_p", "INVALID_TOP_P", id="top-p"
    ),
    pytest.param(
        {"params": pb.GenerationParams(stop=["a", ""])},
        "params.stop[1]",
        "EMPTY_STOP",
        id="empty-stop",
    ),
    pytest.param(
        {"params": pb.GenerationParams(stop=["a", "b", "c", "d", "e"])},
        "params.stop",
        "TOO_MANY_STOPS",
        id="too-many-stops",
    ),
    pytest.param(
        {"messages": [user("x" * 300_000)]}, "messages", "PROMPT_TOO_LARGE", id="oversized-prompt"
    ),
    pytest.param(
        {"tools": [pb.Tool(name="lookup", description="x" * 300_000)]},
        "tools",
        "PROMPT_TOO_LARGE",
        id="oversized-tools",
    ),
    pytest.param({"request_id": "x" * 200}, "request_id", "INVALID_REQUEST_ID", id="long-id"),
    pytest.param(
        {"labels": {"tokenwire.sim/fail-after": "soon"}},
        "labels[tokenwire.sim/fail-after]",
        "INVALID_SIMULATOR_KNOB",
        id="bad-sim-knob",
    ),
]

STREAM_ONLY_BAD_REQUESTS = [
    pytest.param(
        {"delivery_mode": 42}, "delivery_mode", "INVALID_DELIVERY_MODE", id="unknown-mode"
    ),
    pytest.param(
        {"chunking": pb.Chunking(max_tokens_per_chunk=100_000)},
        "chunking.max_tokens_per_chunk",
        "INVALID_CHUNKING",
        id="chunk-too-large",
    ),
    pytest.param(
        {"chunking": pb.Chunking(max_delay={"seconds": 30})},
        "chunking.max_delay",
        "INVALID_CHUNKING",
        id="delay-too-long",
    ),
]


async def assert_still_serving(server: RunningServer) -> None:
    events = await collect(server.stub.StreamRespond(stream_request()))
    assert completed_of(events).verification.status == pb.VERIFICATION_STATUS_VERIFIED


@pytest.mark.parametrize(("fields", "field", "reason"), BAD_REQUESTS + STREAM_ONLY_BAD_REQUESTS)
async def test_bad_stream_request_is_invalid_argument_naming_the_field(
    server: RunningServer, fields: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(stream_request(**fields)))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == reason
    assert details.error_info.domain == "tokenwire.dev"
    assert field in [v.field for v in details.bad_request.field_violations]
    assert server.simulator.stats.started == 0
    await assert_still_serving(server)


@pytest.mark.parametrize(("fields", "field", "reason"), BAD_REQUESTS)
async def test_bad_unary_request_is_invalid_argument_naming_the_field(
    server: RunningServer, fields: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Respond(respond_request(**fields))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == reason
    assert field in [v.field for v in details.bad_request.field_violations]
    await assert_still_serving(server)


async def test_all_violations_are_reported_at_once(server: RunningServer) -> None:
    request = stream_request(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="")],
        params=pb.GenerationParams(max_tokens=-5, top_p=7),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request))
    fields = {v.field for v in status_details(raised.value).bad_request.field_violations}
    assert fields == {"messages[0].content", "params.max_tokens", "params.top_p"}


async def test_unknown_model_is_not_found(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(stream_request(model="gpt-nope")))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.error_info.reason == "MODEL_NOT_FOUND"
    assert details.error_info.metadata["model"] == "gpt-nope"
    assert "tokenwire-sim" in details.error_info.metadata["knownModels"]
    await assert_still_serving(server)


async def test_resume_of_an_unknown_response_is_not_found(server: RunningServer) -> None:
    request = stream_request(resume=pb.ResumeFrom(response_id="rsp_x", after_sequence=3))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.error_info.reason == "RESPONSE_NOT_FOUND"
    assert details.error_info.metadata["responseId"] == "rsp_x"


async def test_backend_failure_mid_stream_names_the_last_delivered_sequence(
    server: RunningServer,
) -> None:
    request = stream_request(
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/fail-after": "7", "tokenwire.sim/inter-token-ms": "1"},
    )
    call = server.stub.StreamRespond(request)
    received: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            received.append(event)
    chunks = chunks_of(received)
    assert not [e for e in received if e.WhichOneof("event") == "completed"]
    assert [c.sequence for c in chunks] == list(range(1, 8))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "BACKEND_FAILED"
    assert details.trailers["tokenwire-last-sequence"] == "7"
    assert details.error_info.metadata["lastSequence"] == "7"
    assert details.error_info.metadata["responseId"] == chunks[0].response_id
    assert details.retry_info is not None and details.retry_info.retry_delay.seconds >= 1
    assert details.trailers["tokenwire-completion-tokens"] == "7"
    assert int(details.trailers["tokenwire-prompt-tokens"]) > 0
    await assert_still_serving(server)


async def test_backend_crash_is_internal_with_details(server: RunningServer) -> None:
    request = stream_request(labels={"tokenwire.sim/raise-after": "3"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.INTERNAL
    assert details.error_info.reason == "BACKEND_ERROR"
    assert details.retry_info is None
    await assert_still_serving(server)


async def test_unary_backend_failure_is_unavailable(server: RunningServer) -> None:
    request = respond_request(labels={"tokenwire.sim/fail-after": "2"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Respond(request)
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.trailers["tokenwire-last-sequence"] == "0"
    assert details.trailers["tokenwire-completion-tokens"] == "2"


async def test_stalled_backend_fails_the_call_and_is_cancelled(
    start_server: StartServer,
) -> None:
    server = await start_server(stall_timeout=0.2, heartbeat_interval=0.05)
    request = stream_request(
        chunking=pb.Chunking(max_tokens_per_chunk=1), labels={"tokenwire.sim/stall-after": "5"}
    )
    received: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in server.stub.StreamRespond(request):
            received.append(event)
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "BACKEND_STALLED"
    assert details.trailers["tokenwire-last-sequence"] == "5"
    assert [e.WhichOneof("event") for e in received].count("heartbeat") >= 1
    assert server.simulator.stats.cancelled == 1
