"""The example validators (examples/validators/python and go) as real processes,
judged through tokenwire's validator runner: the same verdicts and byte spans from
both, an early FAIL in stream mode, and the whole chain a held response will take
(validator -> escalation rule -> review -> WatchReview) on a real server."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import StartServer, require_tool
from tests.test_review_service import CALLER_A, REVIEWER_A, Reviews, bearer, keys_file
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import review_pb2 as rpb
from tokenwire_server.domain import Verdict
from tokenwire_server.governance.escalation import EscalationFacts
from tokenwire_server.review.model import OpenReview
from tokenwire_server.validators.config import Mode, OnFail, ValidatorConfig
from tokenwire_server.validators.runner import Outcome, ResponseFacts, Validators

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "validators"
LISTENING = re.compile(rb"listening on (\S+):(\d+)")


async def _listening(*argv: str, cwd: Path | None = None) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    match = LISTENING.search(line)
    if match is None:
        process.kill()
        _, err = await process.communicate()
        raise AssertionError(f"{argv}: {line!r} {err.decode()[-2000:]}")
    return process, f"127.0.0.1:{match.group(2).decode()}"


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = require_tool("go")  # skips without Go, fails under TOKENWIRE_REQUIRE_POLYGLOT=1

    out = tmp_path_factory.mktemp("go") / "compliance-validator"
    built = subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=EXAMPLES / "go",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    return out


@pytest.fixture(params=["python", "go"])
async def example(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The address of a running example validator."""
    if request.param == "python":
        argv: tuple[str, ...] = (
            sys.executable,
            str(EXAMPLES / "python" / "compliance_validator.py"),
            "--port",
            "0",
        )
    else:
        argv = (str(request.getfixturevalue("go_binary")), "-port", "0")
    process, address = await _listening(*argv)
    try:
        yield address
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


def facts(response_id: str = "rsp-1") -> ResponseFacts:
    return ResponseFacts(response_id=response_id, model="tokenwire-sim", tenant="acme")


def span(text: str, part: str) -> tuple[int, int]:
    start = len(text[: text.index(part)].encode())
    return start, start + len(part.encode())


CASES = [
    ("Index funds spread risk across many companies.", Outcome.PASS, []),
    (
        "Über-simple: buy 100 shares of ACME today.",
        Outcome.ESCALATE,
        [("NUMERIC_ADVICE", "buy 100 shares")],
    ),
    (
        "A fund with a 12% annual return, and you should invest $5,000 in it.",
        Outcome.ESCALATE,
        [("NUMERIC_ADVICE", "12% annual return"), ("NUMERIC_ADVICE", "invest $5,000")],
    ),
    (
        "Our fund offers guaranteed returns — it's risk-free. Buy 10 shares.",
        Outcome.FAIL,
        [("FORBIDDEN_CLAIM", "guaranteed returns"), ("FORBIDDEN_CLAIM", "risk-free")],
    ),
    ("You can't lose with this one.", Outcome.FAIL, [("FORBIDDEN_CLAIM", "can't lose")]),
]


@pytest.mark.parametrize(("text", "outcome", "found"), CASES)
async def test_verdicts_and_spans(
    example: str, text: str, outcome: Outcome, found: list[tuple[str, str]]
) -> None:
    pool = Validators([ValidatorConfig("compliance", example, timeout=10.0)])
    try:
        run = pool.start(facts())
        assert run is not None
        result = await run.finish(text)
    finally:
        await pool.aclose()
    (check,) = result.checks
    assert result.outcome is outcome, check
    assert [(v.code, (v.start, v.end)) for v in check.violations] == [
        (code, span(text, part)) for code, part in found
    ]


async def test_a_forbidden_claim_in_stream_mode_stops_the_release_from_its_window(
    example: str,
) -> None:
    config = ValidatorConfig(
        "compliance",
        example,
        mode=Mode.STREAM,
        timeout=10.0,
        window_chars=1,
        on_fail=OnFail.RETRACT,
    )
    pool = Validators([config])
    try:
        run = pool.start(facts())
        assert run is not None
        safe = "Markets go up and down. "
        run.feed(safe)
        await asyncio.sleep(0.3)  # its own window
        run.feed("This fund is risk-")
        await asyncio.sleep(0.3)
        run.feed("free, they say.")
        deadline = asyncio.get_running_loop().time() + 10
        while not run.halted:  # before the end: the token path stops releasing
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert run.halt_offset == len(safe.encode())  # the claim starts in the second window
        text = safe + "This fund is risk-free, they say."
        result = await run.finish(text)
    finally:
        await pool.aclose()
    final = result.resolve(text, "Blocked by policy.")
    assert final.text == safe and final.cut_offset == len(safe.encode())


async def test_stream_mode_escalates_advice_at_the_end(example: str) -> None:
    config = ValidatorConfig("compliance", example, mode=Mode.STREAM, timeout=10.0)
    pool = Validators([config])
    try:
        run = pool.start(facts())
        assert run is not None
        for piece in ("You should ", "move ", "20% of savings ", "into bonds."):
            run.feed(piece)
        result = await run.finish("You should move 20% of savings into bonds.")
    finally:
        await pool.aclose()
    assert result.outcome is Outcome.ESCALATE and result.escalated_by == ("compliance",)
    assert [v.code for v in result.checks[0].violations] == ["NUMERIC_ADVICE"]


POLICY = """
id: acme-finance
version: "1"
escalation:
  - id: advice-hold
    when:
      validator_outcome: [escalate]
      validators: [compliance]
    action: hold
    expire_after: 600
"""


async def test_the_chain_a_held_response_takes(
    example: str, start_server: StartServer, tmp_path: Path
) -> None:
    """What the response path will do, by hand: validate, decide the escalation,
    open the review; then a reviewer approves and the caller's WatchReview ends
    with the held text."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    server = await start_server(
        policy=str(policy_file),
        auth_keys_file=keys_file(tmp_path / "keys.yaml"),
        audit_path=str(tmp_path / "audit.db"),
    )
    reviews = Reviews(server, str(tmp_path / "audit.db"))
    policy = server.server.policies.current
    assert policy.escalation.may_hold("tokenwire-sim", "acme", {})  # text is kept back
    text = "Buy 100 shares of ACME before Friday."
    pool = Validators([ValidatorConfig("compliance", example, timeout=10.0)])
    try:
        run = pool.start(facts("rsp-held"))
        assert run is not None
        result = await run.finish(text)
    finally:
        await pool.aclose()
    decision = policy.escalation.decide(
        EscalationFacts(
            model="tokenwire-sim",
            tenant="acme",
            validator_outcomes=result.outcomes,
            escalated_by=frozenset(result.escalated_by),
            check_errored=result.errored,
        )
    )
    assert decision is not None and decision.held and decision.rule_ids == ("advice-hold",)
    review = await server.server.reviews.open(
        OpenReview(
            response_id="rsp-held",
            tenant="acme",
            decision=decision,
            governed_text=text,
            verdict=Verdict.ALLOWED,
            checks=result.checks,
            model="tokenwire-sim",
            policy_id=policy.policy_id,
            policy_version=policy.policy_version,
        )
    )
    watch = reviews.stub.WatchReview(
        rpb.WatchReviewRequest(review_id=review.review_id), metadata=bearer(CALLER_A)
    )
    assert (await watch.read()).review.state == pb.REVIEW_STATE_PENDING
    shown = await reviews.get(review.review_id, REVIEWER_A)
    assert shown.checks[0].name == "validator:compliance"
    assert shown.checks[0].outcome == pb.CHECK_OUTCOME_ESCALATED
    await reviews.decide(REVIEWER_A, review_id=review.review_id, decision=1, reason="ok")
    decided = (await asyncio.wait_for(watch.read(), 10)).review
    assert decided.state == pb.REVIEW_STATE_APPROVED and decided.decided_text == text
    assert decided.decided_sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_the_examples_have_their_readme() -> None:
    for language in ("python", "go"):
        readme = (EXAMPLES / language / "README.md").read_text()
        assert (
            "FAIL" in readme
            and "ESCALATE" in readme
            and "tests/test_validators_examples.py" in readme
        )
