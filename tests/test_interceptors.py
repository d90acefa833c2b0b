"""Each interceptor's behaviour, through a real server.

The verification gate is exercised two ways: through the real pipeline with a
policy whose final decision rewrites the text (the divergence a whole-text
policy causes), and around a deliberately broken servicer that skips a
sequence, which the gate must stop before it reaches the caller.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.conftest import (
    StartServer,
    chunks_of,
    collect,
    completed_of,
    make_config,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire_server.audit.store import SqliteAuditStore
from tokenwire_server.domain import Action, Verdict
from tokenwire_server.governance.policy import FinalDecision, GovernanceSession, Policy
from tokenwire_server.interceptors import build_chain
from tokenwire_server.interceptors.call import Call
from tokenwire_server.observability.metrics import Metrics
from tokenwire_server.telemetry import build_tracing


class _RewriteSession(GovernanceSession):
    def __init__(self, final: str | None) -> None:
        self._final = final

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        return text, ()

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        return "", (), FinalDecision(verdict=Verdict.BLOCKED, text=self._final, blocked=True)


class RewritingPolicy(Policy):
    """A whole-text policy that replaces the final payload after streaming."""

    policy_id = "test-rewrite"
    policy_version = "7"

    def __init__(self, final: str) -> None:
        self.final = final

    def open_session(self) -> GovernanceSession:
        return _RewriteSession(self.final)


async def test_gate_marks_divergence_and_names_the_retraction_point(
    start_server: StartServer,
) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    replacement = "The quick brown cat."
    server = await start_server(policy=RewritingPolicy(replacement))
    request = stream_request(
        text,
        model="echo",
        omit_final_text=True,
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/echo-token-chars": "4"},
    )
    events = await collect(server.stub.StreamRespond(request))
    chunks = chunks_of(events)
    completed = completed_of(events)
    assert "".join(c.text for c in chunks) == text
    assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
    assert completed.verification.streamed_sha256 == hashlib.sha256(text.encode()).hexdigest()
    # "The quick brown " is 4 chunks of 4 characters; chunk 5 ("fox ") is the first to differ.
    assert completed.verification.retract_from_sequence == 5
    # omit_final_text is overridden: a diverged caller needs the final text.
    assert completed.final_text == replacement
    assert completed.final_sha256 == hashlib.sha256(replacement.encode()).hexdigest()
    assert completed.verdict == pb.VERDICT_BLOCKED
    assert completed.finish_reason == pb.FINISH_REASON_POLICY_BLOCKED
    assert (completed.policy_id, completed.policy_version) == ("test-rewrite", "7")
    assert all(c.governance.policy_id == "test-rewrite" for c in chunks)


async def test_gate_buffered_delivery_never_diverges(start_server: StartServer) -> None:
    server = await start_server(policy=RewritingPolicy("refused"))
    request = stream_request("secret text", model="echo", delivery_mode=pb.DELIVERY_MODE_BUFFERED)
    events = await collect(server.stub.StreamRespond(request))
    assert [c.text for c in chunks_of(events)] == ["refused"]
    completed = completed_of(events)
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.verdict == pb.VERDICT_BLOCKED


class _BrokenServicer:
    """Skips sequence 2: exactly what the gate exists to stop."""

    async def stream_respond(
        self, request: pb.StreamRespondRequest, context: Any, call: Call
    ) -> AsyncIterator[pb.StreamRespondResponse]:
        offset = 0
        for sequence in (1, 3):
            text = f"chunk{sequence} "
            yield pb.StreamRespondResponse(
                chunk=pb.TokenChunk(sequence=sequence, text=text, text_offset=offset)
            )
            offset += len(text)

    async def respond(
        self, request: pb.RespondRequest, context: Any, call: Call
    ) -> pb.RespondResponse:
        return pb.RespondResponse(completed=pb.Completed(final_text="abc", final_sha256="0" * 64))

    async def cancel(self, request: pb.CancelRequest, context: Any, call: Call) -> None:
        raise AssertionError("not called")


@pytest.fixture
async def broken_server() -> AsyncIterator[respond_pb2_grpc.RespondServiceStub]:
    config = make_config()
    server = grpc.aio.server()
    chain = build_chain(config, build_tracing().provider, SqliteAuditStore(":memory:"), Metrics())
    chain.register(_BrokenServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield respond_pb2_grpc.RespondServiceStub(channel)
    await server.stop(0)


async def test_gate_stops_a_sequence_gap_before_it_is_sent(
    broken_server: respond_pb2_grpc.RespondServiceStub,
) -> None:
    received: list[pb.StreamRespondResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in broken_server.StreamRespond(stream_request()):
            received.append(event)
    assert [e.chunk.sequence for e in received] == [1]
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.DATA_LOSS
    assert details.error_info.reason == "VERIFICATION_FAILED"
    assert details.trailers["tokenwire-last-sequence"] == "1"


async def test_gate_refuses_a_unary_payload_that_does_not_match_its_digest(
    broken_server: respond_pb2_grpc.RespondServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await broken_server.Respond(pb.RespondRequest())
    assert status_details(raised.value).code == grpc.StatusCode.DATA_LOSS


async def test_tracing_continues_the_callers_traceparent(start_server: StartServer) -> None:
    server = await start_server()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    events = await collect(server.stub.StreamRespond(stream_request(), metadata=metadata))
    assert completed_of(events).trace_id == trace_id
    unary = await server.stub.Respond(
        pb.RespondRequest(messages=stream_request().messages), metadata=metadata
    )
    assert unary.completed.trace_id == trace_id


async def test_each_call_gets_its_own_trace(start_server: StartServer) -> None:
    server = await start_server()
    first = completed_of(await collect(server.stub.StreamRespond(stream_request())))
    second = completed_of(await collect(server.stub.StreamRespond(stream_request())))
    assert first.trace_id != second.trace_id
