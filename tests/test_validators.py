"""Validators (server/tokenwire_server/validators): config parsing and the runner,
against real grpc.aio ValidatorService servers on 127.0.0.1:0 that pass, fail,
escalate, replace, answer slowly, hang, crash, answer garbage, or are down."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import collect, completed_of, make_config, stream_request
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire.v1 import validator_pb2_grpc as vgrpc
from tokenwire_server.domain import Message, Role
from tokenwire_server.server import TokenwireServer
from tokenwire_server.validators import calls, verdicts
from tokenwire_server.validators.config import (
    Match,
    Mode,
    OnError,
    OnFail,
    ValidatorConfig,
    ValidatorConfigError,
    parse_validators,
)
from tokenwire_server.validators.runner import (
    Outcome,
    ResponseFacts,
    ValidationResult,
    Validators,
)

SERVICE = vpb.DESCRIPTOR.services_by_name["ValidatorService"].full_name
REFUSAL = "Blocked by policy."

Unary = Callable[[vpb.ValidateRequest, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Streamed = Callable[
    [AsyncIterator[vpb.ValidateStreamRequest], grpc.aio.ServicerContext[Any, Any]],
    AsyncIterator[Any],
]


@dataclass
class Seen:
    """What a test validator received."""

    requests: list[vpb.ValidateRequest] = field(default_factory=list)
    stream: list[vpb.ValidateStreamRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakeValidator:
    address: str
    seen: Seen
    server: grpc.aio.Server


def _passes() -> Unary:
    async def validate(request: vpb.ValidateRequest, context: Any) -> vpb.ValidateResponse:
        return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)

    return validate


def answer(**fields: Any) -> Unary:
    async def validate(request: vpb.ValidateRequest, context: Any) -> vpb.ValidateResponse:
        return vpb.ValidateResponse(**fields)

    return validate


def after(seconds: float, then: Unary) -> Unary:
    async def validate(request: vpb.ValidateRequest, context: Any) -> Any:
        await asyncio.sleep(seconds)
        return await then(request, context)

    return validate


async def _hangs(request: Any, context: Any) -> Any:
    await asyncio.Event().wait()


async def _raises(request: Any, context: Any) -> Any:
    raise RuntimeError("validator bug")


async def _garbage(request: Any, context: Any) -> bytes:
    return b"\xff\xff\xff\x07not a ValidateResponse"


async def _stream_passes_at_end(
    requests: AsyncIterator[vpb.ValidateStreamRequest], context: Any
) -> AsyncIterator[Any]:
    async for request in requests:
        if request.WhichOneof("event") == "end":
            yield vpb.ValidateStreamResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
            return


def stream_fails_on(word: str, **extra: Any) -> Streamed:
    async def validate(
        requests: AsyncIterator[vpb.ValidateStreamRequest], context: Any
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if request.WhichOneof("event") == "window" and word in request.window.text:
                yield vpb.ValidateStreamResponse(
                    outcome=vpb.VALIDATION_OUTCOME_FAIL,
                    violations=[pb.CheckViolation(code="FORBIDDEN", message=word)],
                    window_offset=request.window.offset,
                    **extra,
                )
                return
            if request.WhichOneof("event") == "end":
                yield vpb.ValidateStreamResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
                return

    return validate


async def _stream_hangs(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for _ in requests:
        pass
    await asyncio.Event().wait()
    yield vpb.ValidateStreamResponse()


async def _stream_raises(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for _ in requests:
        raise RuntimeError("validator bug")
    yield vpb.ValidateStreamResponse()


async def _stream_garbage(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for _ in requests:
        yield b"\x0a\xff\xff"
        return


async def _stream_ends_without_verdict(
    requests: AsyncIterator[Any], context: Any
) -> AsyncIterator[Any]:
    async for _ in requests:
        pass
    return
    yield  # pragma: no cover


async def _stream_never_reads(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    await asyncio.Event().wait()
    yield vpb.ValidateStreamResponse()


StartValidator = Callable[..., Awaitable[FakeValidator]]


@pytest.fixture
async def start_validator() -> AsyncIterator[StartValidator]:
    servers: list[grpc.aio.Server] = []

    async def start(
        unary: Unary | None = None,
        streamed: Streamed = _stream_passes_at_end,
        credentials: grpc.ServerCredentials | None = None,
    ) -> FakeValidator:
        seen = Seen()
        behaviour = unary or _passes()

        async def validate(request: vpb.ValidateRequest, context: Any) -> Any:
            seen.requests.append(request)
            context.add_done_callback(lambda _: seen.cancelled.set())
            return await behaviour(request, context)

        async def validate_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            context.add_done_callback(lambda _: seen.cancelled.set())

            async def recorded() -> AsyncIterator[vpb.ValidateStreamRequest]:
                async for request in requests:
                    seen.stream.append(request)
                    yield request

            async for message in streamed(recorded(), context):
                yield message

        def serialize(message: Any) -> bytes:
            return message if isinstance(message, bytes) else message.SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Validate": grpc.unary_unary_rpc_method_handler(
                    validate,
                    request_deserializer=vpb.ValidateRequest.FromString,
                    response_serializer=serialize,
                ),
                "ValidateStream": grpc.stream_stream_rpc_method_handler(
                    validate_stream,
                    request_deserializer=vpb.ValidateStreamRequest.FromString,
                    response_serializer=serialize,
                ),
            },
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        return FakeValidator(f"127.0.0.1:{port}", seen, server)

    yield start
    for server in servers:
        await server.stop(0)


def config(name: str, address: str, **fields: Any) -> ValidatorConfig:
    fields.setdefault("timeout", 1.0)
    return ValidatorConfig(name=name, address=address, **fields)


def facts(**fields: Any) -> ResponseFacts:
    fields.setdefault("response_id", "rsp-1")
    fields.setdefault("model", "tokenwire-sim")
    fields.setdefault("tenant", "acme")
    fields.setdefault("labels", {"risk": "high"})
    fields.setdefault("policy_id", "acme")
    fields.setdefault("policy_version", "7")
    return ResponseFacts(**fields)


@pytest.fixture
async def validators() -> AsyncIterator[Callable[..., Validators]]:
    made: list[Validators] = []

    def make(*configs: ValidatorConfig, **kwargs: Any) -> Validators:
        made.append(Validators(configs, **kwargs))
        return made[-1]

    yield make
    for v in made:
        await v.aclose()


async def validate_once(
    pool: Validators, final_text: str = "All good.", **fact_fields: Any
) -> ValidationResult:
    run = pool.start(facts(**fact_fields))
    assert run is not None
    return await run.finish(final_text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def only(result: ValidationResult) -> pb.VerificationCheck:
    assert len(result.checks) == 1
    return result.checks[0]


def latency(check: pb.VerificationCheck) -> float:
    return float(check.latency.ToNanoseconds() / 1e9)


# ------------------------------------------------------------------------ config


def test_a_full_entry_parses() -> None:
    document = {
        "validators": [
            {
                "name": "compliance",
                "address": "127.0.0.1:7070",
                "mode": "stream",
                "timeout": 0.25,
                "on_error": "escalate",
                "window_chars": 64,
                "send_messages": True,
                "match": {"models": ["m"], "tenants": ["acme"], "labels": {"risk": "high"}},
            },
            {"name": "gate", "address": "validator:7071", "release_gate": True},
        ]
    }
    stream, gate = parse_validators(document, "tokenwire.toml")
    assert stream.mode is Mode.STREAM and stream.on_fail is OnFail.RETRACT
    assert stream.on_error is OnError.ESCALATE and stream.timeout == 0.25
    assert stream.window_chars == 64 and stream.send_messages
    assert stream.match == Match(frozenset({"m"}), frozenset({"acme"}), (("risk", "high"),))
    assert stream.check_name == "validator:compliance"
    assert gate.mode is Mode.VALIDATE and gate.on_fail is OnFail.BLOCK and gate.release_gate
    assert gate.on_error is OnError.FAIL_CLOSED and gate.timeout == 1.0
    assert parse_validators({}, "x.toml") == ()


def test_every_bad_field_is_named_with_file_and_entry(tmp_path: Path) -> None:
    document = {
        "validators": [
            {"name": "ok", "address": "a:1"},
            {
                "name": "bad",
                "address": "",
                "mode": "sometimes",
                "timeout": 0,
                "on_error": "shrug",
                "window_chars": 0,
                "tls_ca": "missing.pem",
                "colour": "blue",
                "match": {"models": "m", "regions": []},
            },
            {"name": "gate", "address": "a:2", "mode": "stream", "release_gate": True},
            {"name": "ok", "address": "a:3"},
        ]
    }
    source = f"config file {tmp_path / 'tokenwire.toml'}"
    with pytest.raises(ValidatorConfigError) as raised:
        parse_validators(document, source, base_dir=tmp_path)
    message = str(raised.value)
    for expected in (
        f"{source}: validators[1] (bad).address: must be a non-empty string",
        "validators[1] (bad).mode: must be validate | stream, not 'sometimes'",
        "validators[1] (bad).timeout: must be a number of seconds > 0 and <= 60",
        "validators[1] (bad).on_error: must be fail_closed | pass | escalate",
        "validators[1] (bad).window_chars: must be an integer from 1 to 65536",
        f"validators[1] (bad).tls_ca: no file at {tmp_path / 'missing.pem'}",
        "validators[1] (bad).colour: unknown key",
        "validators[1] (bad).match.models: must be a list of model names",
        "validators[1] (bad).match.regions: unknown key",
        "validators[2] (gate).release_gate: needs mode = validate",
        "the name 'ok' is used twice",
    ):
        assert expected in message, (expected, message)
    with pytest.raises(ValidatorConfigError, match=r"validators must be \[\[validators\]\] tables"):
        parse_validators({"validators": {"name": "x"}}, source)
    with pytest.raises(ValidatorConfigError, match=r"validators\[0\]\.name: is required"):
        parse_validators({"validators": [{"address": "a:1"}]}, source)


def test_a_relative_tls_ca_is_read_from_the_files_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("PEM")
    document = {"validators": [{"name": "v", "address": "a:1", "tls_ca": "ca.pem"}]}
    (validator,) = parse_validators(document, "config file x.toml", base_dir=tmp_path)
    assert validator.tls_ca == str(tmp_path / "ca.pem") and validator.uses_tls


def test_matching_by_model_tenant_and_labels() -> None:
    everyone = config("all", "a:1")
    acme_high = config(
        "acme",
        "a:1",
        match=Match(frozenset({"m"}), frozenset({"acme"}), (("risk", "high"),)),
    )
    pool = Validators([everyone, acme_high])
    assert pool.matching("m", "acme", {"risk": "high", "x": "y"}) == (everyone, acme_high)
    assert pool.matching("m", "acme", {"risk": "low"}) == (everyone,)
    assert pool.matching("other", "acme", {"risk": "high"}) == (everyone,)
    assert pool.matching("m", "globex", {"risk": "high"}) == (everyone,)


async def test_no_matching_validator_means_no_run() -> None:
    pool = Validators([config("x", "a:1", match=Match(tenants=frozenset({"globex"})))])
    assert pool.start(facts(tenant="acme")) is None
    await pool.aclose()


# ------------------------------------------------------------------ validate mode


async def test_pass_is_a_passed_check_with_latency_and_the_facts_sent(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator(after(0.05, _passes()))
    pool = validators(config("ok", validator.address))
    messages = (Message(Role.USER, "hello"),)
    result = await validate_once(pool, "The answer.", messages=messages, model_version="v3")
    check = only(result)
    assert check.name == "validator:ok" and check.outcome == pb.CHECK_OUTCOME_PASSED
    assert 0.05 <= latency(check) < 0.5
    assert result.outcome is Outcome.PASS and result.passed and not result.errored
    assert result.resolve("The answer.", REFUSAL).text == "The answer."
    assert not result.resolve("The answer.", REFUSAL).changed
    (request,) = validator.seen.requests
    assert request.final_text == "The answer." and request.response_id == "rsp-1"
    assert request.tenant == "acme" and dict(request.labels) == {"risk": "high"}
    assert (request.model, request.model_version) == ("tokenwire-sim", "v3")
    assert (request.policy_id, request.policy_version) == ("acme", "7")
    assert not request.messages  # only with send_messages
    with_messages = validators(config("ok", validator.address, send_messages=True))
    await validate_once(with_messages, messages=messages)
    assert [m.content for m in validator.seen.requests[-1].messages] == ["hello"]
    assert validator.seen.requests[-1].messages[0].role == pb.ROLE_USER


async def test_fail_blocks_with_the_refusal_and_keeps_the_violations(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    violation = pb.CheckViolation(code="FORBIDDEN_CLAIM", message="guaranteed", start=4, end=14)
    validator = await start_validator(
        answer(outcome=vpb.VALIDATION_OUTCOME_FAIL, violations=[violation], reason="claims")
    )
    result = await validate_once(validators(config("c", validator.address)), "Our guaranteed X")
    check = only(result)
    assert check.outcome == pb.CHECK_OUTCOME_FAILED and list(check.violations) == [violation]
    assert result.outcome is Outcome.FAIL and not result.passed
    assert result.reasons == ("validator c: fail (claims)",)
    final = result.resolve("Our guaranteed X", REFUSAL)
    assert final.blocked and final.text == REFUSAL


async def test_fail_that_retracts_cuts_before_the_first_violation(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    text = "Safe part. Forbidden — part."
    start = len(b"Safe part. ")
    validator = await start_validator(
        answer(
            outcome=vpb.VALIDATION_OUTCOME_FAIL,
            violations=[
                pb.CheckViolation(code="B", start=start + 3, end=start + 6),
                pb.CheckViolation(code="A", start=start, end=start + 9),
            ],
        )
    )
    pool = validators(config("c", validator.address, on_fail=OnFail.RETRACT))
    final = (await validate_once(pool, text)).resolve(text, REFUSAL)
    assert final.text == "Safe part. " and final.cut_offset == start and not final.blocked


async def test_escalate_and_replacement(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    escalates = await start_validator(answer(outcome=vpb.VALIDATION_OUTCOME_ESCALATE))
    replaces = await start_validator(
        answer(outcome=vpb.VALIDATION_OUTCOME_PASS, replacement_text="Fixed text.")
    )
    pool = validators(config("esc", escalates.address), config("fix", replaces.address))
    result = await validate_once(pool, "Original.")
    assert [c.outcome for c in result.checks] == [
        pb.CHECK_OUTCOME_ESCALATED,
        pb.CHECK_OUTCOME_PASSED,
    ]
    assert result.outcome is Outcome.ESCALATE and result.passed
    assert result.escalated_by == ("esc",)
    assert result.outcomes == {"esc": "escalate", "fix": "pass"}
    final = result.resolve("Original.", REFUSAL)
    assert final.text == "Fixed text." and final.replaced_by == "fix" and final.changed


async def test_a_failing_validators_replacement_wins_over_another_ones(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    passes = await start_validator(answer(outcome=1, replacement_text="pass replacement"))
    fails = await start_validator(answer(outcome=2, replacement_text="fail replacement"))
    blocks = await start_validator(answer(outcome=2))
    pool = validators(config("p", passes.address), config("f", fails.address))
    final = (await validate_once(pool)).resolve("x", REFUSAL)
    assert (final.text, final.replaced_by) == ("fail replacement", "f")
    pool = validators(config("p", passes.address), config("b", blocks.address))
    assert (await validate_once(pool)).resolve("x", REFUSAL).blocked


async def test_validators_run_concurrently(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    slow = [await start_validator(after(0.8, _passes())) for _ in range(4)]
    pool = validators(*(config(f"v{i}", v.address, timeout=5.0) for i, v in enumerate(slow)))
    started = time.perf_counter()
    result = await validate_once(pool)
    elapsed = time.perf_counter() - started
    assert len(result.checks) == 4 and result.passed
    assert elapsed < 0.8 * 2, elapsed  # one after another would take 3.2 s


@pytest.mark.parametrize(
    ("on_error", "effective", "blocked"),
    [
        (OnError.FAIL_CLOSED, Outcome.FAIL, True),
        (OnError.PASS, Outcome.PASS, False),
        (OnError.ESCALATE, Outcome.ESCALATE, False),
    ],
)
async def test_a_hanging_validator_times_out_and_its_error_rule_applies(
    start_validator: StartValidator,
    validators: Callable[..., Validators],
    on_error: OnError,
    effective: Outcome,
    blocked: bool,
) -> None:
    validator = await start_validator(_hangs)
    pool = validators(config("hang", validator.address, timeout=0.2, on_error=on_error))
    started = time.perf_counter()
    result = await validate_once(pool, "text")
    elapsed = time.perf_counter() - started
    check = only(result)
    assert check.outcome == pb.CHECK_OUTCOME_TIMED_OUT
    assert [v.code for v in check.violations] == ["VALIDATOR_TIMEOUT"]
    assert 0.2 <= elapsed < 1.5 and 0.18 <= latency(check) < 1.5
    assert result.outcome is effective and result.errored
    assert result.outcomes == {"hang": "timed_out"}
    assert result.resolve("text", REFUSAL).blocked is blocked
    await asyncio.wait_for(validator.seen.cancelled.wait(), 10)  # the call was cancelled


async def test_a_slow_validator_within_its_timeout_passes(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator(after(0.15, _passes()))
    result = await validate_once(validators(config("slow", validator.address, timeout=1.0)))
    assert only(result).outcome == pb.CHECK_OUTCOME_PASSED


async def test_the_response_deadline_cuts_a_validators_timeout(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator(_hangs)
    pool = validators(config("hang", validator.address, timeout=10.0))
    started = time.perf_counter()
    result = await validate_once(pool, deadline=time.monotonic() + 0.2)
    assert only(result).outcome == pb.CHECK_OUTCOME_TIMED_OUT
    assert time.perf_counter() - started < 3.0  # not its 10 s timeout


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        (_raises, "VALIDATOR_ERROR"),
        (_garbage, "VALIDATOR_BAD_ANSWER"),
        (answer(outcome=vpb.VALIDATION_OUTCOME_UNSPECIFIED), "VALIDATOR_BAD_ANSWER"),
        (answer(outcome=7), "VALIDATOR_BAD_ANSWER"),
    ],
    ids=["crashing-handler", "garbage-bytes", "unspecified-outcome", "unknown-outcome"],
)
async def test_a_crash_or_garbage_is_an_error_check(
    start_validator: StartValidator,
    validators: Callable[..., Validators],
    behaviour: Unary,
    code: str,
) -> None:
    validator = await start_validator(behaviour)
    result = await validate_once(validators(config("bad", validator.address)))
    check = only(result)
    assert check.outcome == pb.CHECK_OUTCOME_ERROR
    assert [v.code for v in check.violations] == [code]
    assert result.outcome is Outcome.FAIL and result.errored  # fail_closed by default


async def test_a_validator_that_is_down_errors_at_once(
    validators: Callable[..., Validators],
) -> None:
    pool = validators(
        config("down", f"127.0.0.1:{free_port()}", timeout=10.0, on_error=OnError.PASS)
    )
    for _ in range(2):  # the second call fails as fast, on a channel in backoff
        started = time.perf_counter()
        result = await validate_once(pool)
        assert time.perf_counter() - started < 2.0  # not its 10 s timeout
        check = only(result)
        assert check.outcome == pb.CHECK_OUTCOME_ERROR
        assert [v.code for v in check.violations] == ["VALIDATOR_UNAVAILABLE"]
        assert result.outcome is Outcome.PASS and result.errored


_DIES = """
import asyncio, os, sys, grpc
from tokenwire.v1 import validator_pb2_grpc as vgrpc

class Dies(vgrpc.ValidatorServiceServicer):
    async def Validate(self, request, context):
        os._exit(3)

async def main():
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(Dies(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def test_a_validator_process_that_dies_mid_call_is_an_error(
    validators: Callable[..., Validators],
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DIES, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        pool = validators(config("dies", f"127.0.0.1:{port}", timeout=10.0))
        started = time.perf_counter()
        result = await validate_once(pool)
        assert time.perf_counter() - started < 5.0  # not its 10 s timeout
        check = only(result)
        assert check.outcome == pb.CHECK_OUTCOME_ERROR
        assert check.violations[0].code == "VALIDATOR_UNAVAILABLE"
        assert await asyncio.wait_for(process.wait(), 5) == 3
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_validator_back_up_is_used_again(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    port = free_port()
    pool = validators(config("flaky", f"127.0.0.1:{port}"))
    assert only(await validate_once(pool)).outcome == pb.CHECK_OUTCOME_ERROR
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(_AlwaysPass(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        deadline = time.monotonic() + 5
        while True:  # the channel's reconnect backoff is at most 2 s
            result = await validate_once(pool)
            if only(result).outcome == pb.CHECK_OUTCOME_PASSED or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert only(result).outcome == pb.CHECK_OUTCOME_PASSED
    finally:
        await server.stop(0)


class _AlwaysPass(vgrpc.ValidatorServiceServicer):
    async def Validate(self, request: Any, context: Any) -> vpb.ValidateResponse:
        return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)


async def test_oversized_violation_lists_and_texts_are_clipped(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    many = [pb.CheckViolation(code="C" * 500, message="m" * 5000) for _ in range(100)]
    validator = await start_validator(
        answer(outcome=vpb.VALIDATION_OUTCOME_ESCALATE, violations=many)
    )
    check = only(await validate_once(validators(config("v", validator.address))))
    assert len(check.violations) == verdicts.MAX_VIOLATIONS
    assert len(check.violations[0].code) == verdicts.MAX_CODE_CHARS
    assert len(check.violations[0].message) == verdicts.MAX_MESSAGE_CHARS


async def test_a_tls_validator(
    validators: Callable[..., Validators], start_validator: StartValidator, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("validator.internal")
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())]
    )
    validator = await start_validator(credentials=credentials)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pool = validators(
        config(
            "tls",
            validator.address,
            tls_ca=str(ca_file),
            tls_server_name="validator.internal",
        )
    )
    assert only(await validate_once(pool)).outcome == pb.CHECK_OUTCOME_PASSED
    plaintext = validators(config("plain", validator.address))
    assert only(await validate_once(plaintext)).outcome == pb.CHECK_OUTCOME_ERROR


async def test_each_verdict_reaches_the_check_hook(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    seen: list[tuple[str, str, float]] = []
    good = await start_validator()
    pool = validators(
        config("good", good.address),
        config("down", f"127.0.0.1:{free_port()}"),
        on_check=lambda *args: seen.append(args),
    )
    await validate_once(pool)
    assert sorted((name, word) for name, word, _ in seen) == [("down", "error"), ("good", "pass")]


# -------------------------------------------------------------------- stream mode


def stream_config(name: str, address: str, **fields: Any) -> ValidatorConfig:
    fields.setdefault("window_chars", 8)
    fields.setdefault("on_fail", OnFail.RETRACT)
    return config(name, address, mode=Mode.STREAM, **fields)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_stream_windows_carry_the_released_text_in_order(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator()
    pool = validators(stream_config("s", validator.address))
    run = pool.start(facts())
    assert run is not None and not run.gates_release
    pieces = ["Hé", "llo ", "wörld, ", "this ", "is ", "streamed", "."]
    for piece in pieces:
        run.feed(piece)
        await asyncio.sleep(0.01)
    text = "".join(pieces)
    result = await run.finish(text)
    assert only(result).outcome == pb.CHECK_OUTCOME_PASSED
    kinds = [r.WhichOneof("event") for r in validator.seen.stream]
    assert kinds[0] == "start" and kinds[-1] == "end" and "window" in kinds
    start = validator.seen.stream[0].start
    assert start.response_id == "rsp-1" and start.final_text == ""
    windows = [r.window for r in validator.seen.stream if r.WhichOneof("event") == "window"]
    assert "".join(w.text for w in windows) == text
    offset = 0
    for window in windows:
        assert window.offset == offset
        offset += len(window.text.encode())
    end = validator.seen.stream[-1].end
    assert end.final_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert not end.diverged and end.final_text == ""


async def test_stream_end_states_a_divergent_final_text(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator()
    run = validators(stream_config("s", validator.address)).start(facts())
    assert run is not None
    run.feed("streamed text")
    await run.finish("Blocked by policy.")
    end = validator.seen.stream[-1].end
    assert end.diverged and end.final_text == "Blocked by policy."


async def test_a_stream_fail_halts_release_and_retracts_from_the_failing_window(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator(streamed=stream_fails_on("guaranteed"))
    run = validators(stream_config("claims", validator.address)).start(facts())
    assert run is not None
    safe = "Returns vary. "
    run.feed(safe)
    await until(lambda: any(r.WhichOneof("event") == "window" for r in validator.seen.stream))
    assert not run.halted
    run.feed("They are guaranteed! ")
    await until(lambda: run.halted)  # before finish: the token path stops releasing
    assert run.halt_offset == len(safe.encode())
    run.feed("more text that is never sent")  # ignored after the verdict
    text = safe + "They are guaranteed! more"
    result = await run.finish(text)
    check = only(result)
    assert check.outcome == pb.CHECK_OUTCOME_FAILED and latency(check) == 0.0
    final = result.resolve(text, REFUSAL)
    assert final.text == safe and final.cut_offset == len(safe.encode())
    assert not any("never sent" in r.window.text for r in validator.seen.stream)


async def test_a_stream_fail_can_block_instead(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator(streamed=stream_fails_on("guaranteed"))
    pool = validators(stream_config("claims", validator.address, on_fail=OnFail.BLOCK))
    run = pool.start(facts())
    assert run is not None
    run.feed("guaranteed returns")
    await until(lambda: run.halted)
    assert run.halt_offset == 0
    final = (await run.finish("guaranteed returns")).resolve("guaranteed returns", REFUSAL)
    assert final.blocked and final.text == REFUSAL


@pytest.mark.parametrize(
    ("behaviour", "outcome", "code"),
    [
        (_stream_hangs, pb.CHECK_OUTCOME_TIMED_OUT, "VALIDATOR_TIMEOUT"),
        (_stream_raises, pb.CHECK_OUTCOME_ERROR, "VALIDATOR_ERROR"),
        (_stream_garbage, pb.CHECK_OUTCOME_ERROR, "VALIDATOR_BAD_ANSWER"),
        (_stream_ends_without_verdict, pb.CHECK_OUTCOME_ERROR, "VALIDATOR_BAD_ANSWER"),
    ],
    ids=["hanging", "crashing", "garbage", "no-verdict"],
)
async def test_a_broken_stream_validator_is_an_error_within_its_timeout(
    start_validator: StartValidator,
    validators: Callable[..., Validators],
    behaviour: Streamed,
    outcome: int,
    code: str,
) -> None:
    validator = await start_validator(streamed=behaviour)
    pool = validators(stream_config("s", validator.address, timeout=0.3, on_error=OnError.ESCALATE))
    run = pool.start(facts())
    assert run is not None
    run.feed("some released text")
    started = time.perf_counter()
    result = await run.finish("some released text")
    assert time.perf_counter() - started < 2.0  # its 0.3 s timeout, with room for a busy machine
    check = only(result)
    assert check.outcome == outcome and [v.code for v in check.violations] == [code]
    assert result.outcome is Outcome.ESCALATE and result.errored


async def test_a_stream_validator_that_is_down_fails_closed_and_halts(
    validators: Callable[..., Validators],
) -> None:
    run = validators(stream_config("down", f"127.0.0.1:{free_port()}")).start(facts())
    assert run is not None
    await until(lambda: run.halted)  # fail_closed: stop releasing at once
    result = await run.finish("")
    assert only(result).outcome == pb.CHECK_OUTCOME_ERROR
    assert result.resolve("x", REFUSAL).blocked


async def test_feed_never_blocks_on_a_validator_that_does_not_read(
    start_validator: StartValidator,
    validators: Callable[..., Validators],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calls, "MAX_BACKLOG_CHARS", 200_000)
    validator = await start_validator(streamed=_stream_never_reads)
    pool = validators(stream_config("stuck", validator.address, on_error=OnError.PASS))
    run = pool.start(facts())
    assert run is not None
    chunk = "x" * 4000
    feeding = 0.0
    for _ in range(4000):  # 16 MB: past HTTP/2 flow control and past the backlog cap
        started = time.perf_counter()
        run.feed(chunk)
        feeding += time.perf_counter() - started
        await asyncio.sleep(0)
    assert feeding < 0.5, feeding  # 4,000 feeds, none waiting on the validator
    result = await run.finish(chunk * 4000)
    check = only(result)
    assert check.outcome == pb.CHECK_OUTCOME_ERROR
    assert [v.code for v in check.violations] == ["VALIDATOR_BACKLOG"]
    assert result.outcome is Outcome.PASS


async def test_cancel_stops_the_stream_validator(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    validator = await start_validator(streamed=_stream_hangs)
    run = validators(stream_config("s", validator.address)).start(facts())
    assert run is not None
    run.feed("text")
    await until(lambda: len(validator.seen.stream) >= 1)
    run.cancel()
    await asyncio.wait_for(validator.seen.cancelled.wait(), 2)


async def test_mixed_modes_one_result(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    unary = await start_validator(answer(outcome=vpb.VALIDATION_OUTCOME_ESCALATE))
    streamed = await start_validator()
    pool = validators(
        config("final", unary.address, release_gate=True),
        stream_config("live", streamed.address),
    )
    run = pool.start(facts())
    assert run is not None and run.gates_release
    run.feed("Hello there, world.")
    result = await run.finish("Hello there, world.")
    assert [c.name for c in result.checks] == ["validator:final", "validator:live"]
    assert result.outcome is Outcome.ESCALATE
    summary = result.summary()
    assert summary[0]["check"] == "validator:final" and summary[0]["outcome"] == "escalate"
    assert set(summary[1]) == {
        "check",
        "outcome",
        "effective",
        "latency_ms",
        "violations",
        "replaced",
    }


async def test_a_reload_keeps_running_responses_on_their_validators(
    start_validator: StartValidator, validators: Callable[..., Validators]
) -> None:
    first = await start_validator(after(0.2, _passes()))
    second = await start_validator(answer(outcome=vpb.VALIDATION_OUTCOME_FAIL))
    pool = validators(config("v", first.address))
    running = pool.start(facts())
    assert running is not None
    pool.configure([config("v", second.address)])
    assert only(await running.finish("x")).outcome == pb.CHECK_OUTCOME_PASSED
    assert only(await validate_once(pool)).outcome == pb.CHECK_OUTCOME_FAILED
    pool.configure([])
    assert pool.start(facts()) is None


async def test_through_the_server_each_verdict_is_counted(
    start_validator: StartValidator,
) -> None:
    validator = await start_validator()
    config = dataclasses.replace(
        make_config(), validators=(ValidatorConfig("counted", validator.address),)
    )
    server = TokenwireServer(config)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            completed = completed_of(await collect(stub.StreamRespond(stream_request())))
        assert [c.name for c in completed.verification.checks if c.name != "integrity"] == [
            "validator:counted"
        ]
        sample = server.metrics.registry.get_sample_value
        assert (
            sample("tokenwire_validator_checks_total", {"validator": "counted", "outcome": "pass"})
            == 1
        )
        assert sample("tokenwire_validator_latency_seconds_count", {"validator": "counted"}) == 1
    finally:
        await server.drain(grace=0)
