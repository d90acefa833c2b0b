"""The validation path through the real server: validators' verdicts act on the
response, and escalation rules hold or queue it for review (issue 21).

Validators are real grpc.aio ValidatorService servers on port 0; the server
reads them from `[[validators]]` in its config file, and escalation rules from
the policy file, as a deployment would.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import (
    chunks_of,
    collect,
    completed_of,
    make_config,
    respond_request,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire.v1 import validator_pb2_grpc as vgrpc
from tokenwire_server.config import read_file_settings
from tokenwire_server.server import TokenwireServer

TEXT = "Returns are guaranteed to double every year"


class Judge(vgrpc.ValidatorServiceServicer):
    """Fails text that promises returns; passes anything else."""

    def __init__(self, replacement: str | None = None) -> None:
        self.replacement = replacement
        self.seen: list[str] = []

    async def Validate(self, request: vpb.ValidateRequest, context: Any) -> vpb.ValidateResponse:
        self.seen.append(request.final_text)
        if "guaranteed" not in request.final_text:
            return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
        answer = vpb.ValidateResponse(
            outcome=vpb.VALIDATION_OUTCOME_FAIL,
            reason="promises returns",
            violations=[pb.CheckViolation(code="FORBIDDEN_CLAIM", message="guaranteed returns")],
        )
        if self.replacement is not None:
            answer.replacement_text = self.replacement
        return answer


@pytest.fixture
async def judge_address() -> AsyncIterator[tuple[Judge, str]]:
    judge = Judge()
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(judge, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield judge, f"127.0.0.1:{port}"
    await server.stop(0)


async def _serve(
    tmp_path: Path, config_toml: str, policy: str | None = None
) -> tuple[TokenwireServer, grpc.aio.Channel, respond_pb2_grpc.RespondServiceStub]:
    file = tmp_path / "tokenwire.toml"
    file.write_text(config_toml)
    overrides: dict[str, object] = {}
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(policy)
        overrides["policy"] = str(tmp_path / "policy.yaml")
    config = dataclasses.replace(
        make_config(**overrides), validators=read_file_settings(file).validators
    )
    server = TokenwireServer(config)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, respond_pb2_grpc.RespondServiceStub(channel)


def _validator(address: str, **extra: str) -> str:
    lines = ["[[validators]]", 'name = "claims"', f'address = "{address}"']
    lines += [f'{key} = "{value}"' for key, value in extra.items()]
    return "\n".join(lines) + "\n"


async def test_a_failing_validator_blocks_and_the_divergence_is_stated(
    tmp_path: Path, judge_address: tuple[Judge, str]
) -> None:
    judge, address = judge_address
    server, channel, stub = await _serve(tmp_path, _validator(address))
    try:
        request = stream_request(TEXT, model="echo", chunking=pb.Chunking(max_tokens_per_chunk=1))
        events = await collect(stub.StreamRespond(request))
        completed = completed_of(events)
        assert "".join(c.text for c in chunks_of(events)) == TEXT  # streamed meanwhile
        assert judge.seen == [TEXT]
        checks = {c.name: c for c in completed.verification.checks}
        assert checks["validator:claims"].outcome == pb.CHECK_OUTCOME_FAILED
        assert [v.code for v in checks["validator:claims"].violations] == ["FORBIDDEN_CLAIM"]
        assert checks["integrity"].outcome == pb.CHECK_OUTCOME_PASSED
        assert completed.verification.checks_passed is False
        assert completed.verdict == pb.VERDICT_BLOCKED
        assert completed.final_text != TEXT
        assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
        assert completed.verification.retract_from_sequence == 1
        # Clean text passes and nothing diverges.
        clean = completed_of(
            await collect(stub.StreamRespond(stream_request("hello", model="echo")))
        )
        assert clean.verification.checks_passed is True
        assert clean.verification.status == pb.VERIFICATION_STATUS_VERIFIED
        unary = (await stub.Respond(respond_request(TEXT, model="echo"))).completed
        assert unary.verdict == pb.VERDICT_BLOCKED and unary.final_text != TEXT
    finally:
        await channel.close()
        await server.drain(grace=0)


async def test_a_release_gate_releases_only_the_validated_payload(
    tmp_path: Path, judge_address: tuple[Judge, str]
) -> None:
    judge, address = judge_address
    judge.replacement = "Past returns say nothing about future returns."
    server, channel, stub = await _serve(tmp_path, _validator(address) + "release_gate = true\n")
    try:
        events = await collect(stub.StreamRespond(stream_request(TEXT, model="echo")))
        completed = completed_of(events)
        assert [c.text for c in chunks_of(events)] == [judge.replacement]
        assert completed.final_text == judge.replacement
        assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
        assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    finally:
        await channel.close()
        await server.drain(grace=0)


async def test_a_validator_that_is_down_fails_closed_within_its_timeout(tmp_path: Path) -> None:
    server, channel, stub = await _serve(tmp_path, _validator("127.0.0.1:1") + "timeout = 0.5\n")
    try:
        completed = (await stub.Respond(respond_request("hello", model="echo"))).completed
        (check,) = [c for c in completed.verification.checks if c.name == "validator:claims"]
        assert check.outcome in (pb.CHECK_OUTCOME_ERROR, pb.CHECK_OUTCOME_TIMED_OUT)
        assert completed.verdict == pb.VERDICT_BLOCKED  # fail_closed is the default
        assert completed.verification.checks_passed is False  # an error under fail_closed
    finally:
        await channel.close()
        await server.drain(grace=0)


HOLD_POLICY = """\
id: held
version: 1
escalation:
  - id: high-risk
    when:
      labels: {risk: high}
    action: hold
"""


async def test_a_hold_rule_releases_nothing_and_opens_a_pending_review(tmp_path: Path) -> None:
    server, channel, stub = await _serve(tmp_path, "", policy=HOLD_POLICY)
    try:
        held = stream_request(TEXT, model="echo", labels={"risk": "high"})
        events = await collect(stub.StreamRespond(held))
        completed = completed_of(events)
        assert chunks_of(events) == []
        assert completed.final_text == "" and completed.review.held
        assert completed.review.state == pb.REVIEW_STATE_PENDING
        review = await server.reviews.get(completed.review.review_id)
        assert review is not None and review.governed_text == TEXT and review.held
        # Another label: streamed as usual, no review.
        normal = completed_of(await collect(stub.StreamRespond(stream_request(TEXT, model="echo"))))
        assert normal.final_text == TEXT and not normal.HasField("review")
    finally:
        await channel.close()
        await server.drain(grace=0)


class Hanging(vgrpc.ValidatorServiceServicer):
    async def Validate(self, request: vpb.ValidateRequest, context: Any) -> vpb.ValidateResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_hanging_validator_cannot_outlast_the_calls_deadline(tmp_path: Path) -> None:
    hanging = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(Hanging(), hanging)
    port = hanging.add_insecure_port("127.0.0.1:0")
    await hanging.start()
    file = tmp_path / "tokenwire.toml"
    file.write_text(_validator(f"127.0.0.1:{port}") + "timeout = 60\n")
    config = dataclasses.replace(
        make_config(default_deadline=1, max_deadline=1),
        validators=read_file_settings(file).validators,
    )
    server = TokenwireServer(config)
    address = f"127.0.0.1:{await server.start()}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            started = asyncio.get_running_loop().time()
            try:
                completed = (await stub.Respond(respond_request("hello", model="echo"))).completed
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            else:  # the validator's call was bounded by the same deadline
                (check,) = [c for c in completed.verification.checks if c.name != "integrity"]
                assert check.outcome in (pb.CHECK_OUTCOME_TIMED_OUT, pb.CHECK_OUTCOME_ERROR)
            assert asyncio.get_running_loop().time() - started < 5
            # The server goes on serving.
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest())
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.drain(grace=0)
        await hanging.stop(0)
