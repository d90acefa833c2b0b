"""Governance against adversarial text: values glued to their neighbours, responses
that end inside a value, rules that backtrack catastrophically.

The promise under test is that no raw fragment of a value (the value minus its
last character; any 12-character window of a secret) reaches anything a caller
can see, however the value is surrounded, however the text is cut into tokens,
and however the response ends.
"""

from __future__ import annotations

import asyncio
import string
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import regex
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import StartServer, chunks_of, collect, completed_of, stream_request
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import Operator
from tokenwire_server.governance.detectors import (
    BUILTIN_DETECTORS,
    IBAN_LENGTHS,
    MATCH_BUDGET_SECONDS,
)
from tokenwire_server.governance.policy_file import PolicyError, load_policy
from tokenwire_server.governance.redaction import RedactionRule, Redactor

ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"
UPPER_DIGITS = string.ascii_uppercase + string.digits


def _chars(alphabet: str, size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=size, max_size=size)


def _luhn_complete(body: str) -> str:
    for check in string.digits:
        digits = [int(c) for c in body + check]
        total = sum(
            (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 else d
            for i, d in enumerate(reversed(digits))
        )
        if total % 10 == 0:
            return body + check
    raise AssertionError("unreachable")


def _iban(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    number = int("".join(str(int(c, 36)) for c in rearranged))
    return f"{country}{98 - number % 97:02d}{bban}"


@st.composite
def ibans(draw: st.DrawFn) -> str:
    country = draw(st.sampled_from(["GB", "DE", "FR", "NL", "NO", "ES"]))
    bban = draw(_chars(UPPER_DIGITS, IBAN_LENGTHS[country] - 4))
    value = _iban(country, bban)
    if draw(st.booleans()):
        value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    return value


@st.composite
def pem_keys(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["", "RSA ", "EC ", "DSA ", "OPENSSH ", "ENCRYPTED "]))
    lines = draw(st.lists(_chars(ALNUM + "+/", 24), min_size=1, max_size=4))
    body = "\n".join(lines)
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"


#: Generated values per detector; secrets are checked window by window too.
VALUES: dict[str, st.SearchStrategy[str]] = {
    "aws_access_key": st.builds(
        lambda p, b: p + b, st.sampled_from(["AKIA", "ASIA"]), _chars(UPPER_DIGITS, 16)
    ),
    "github": st.one_of(
        st.builds(
            lambda p, b: p + b,
            st.sampled_from(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]),
            _chars(ALNUM, 36),
        ),
        st.builds(lambda b: "github_pat_" + b, _chars(ALNUM + "_", 82)),
    ),
    "openai": st.one_of(
        st.builds(lambda b: "sk-" + b, _chars(ALNUM, 48)),
        st.builds(lambda b: "sk-proj-" + b, _chars(B64URL, 64)),
    ),
    "slack": st.builds(
        lambda k, a, b: f"xox{k}-{a}-{b}",
        st.sampled_from("abprs"),
        _chars(string.digits, 12),
        _chars(ALNUM, 24),
    ),
    "jwt": st.builds(
        lambda h, p, s: f"eyJ{h}.eyJ{p}.{s}",
        _chars(B64URL, 20),
        _chars(B64URL, 30),
        _chars(B64URL, 43),
    ),
    "private_key": pem_keys(),
    "iban": ibans(),
    "phone": st.sampled_from(
        ["+1 415-555-0134", "+44 20 7946 0958", "+14155550134", "(415) 555-0134", "415-555-0134"]
    ),
    "payment_card": st.builds(
        lambda b: _luhn_complete(b), st.from_regex(r"4[0-9]{14}", fullmatch=True)
    ),
    "us_ssn": st.from_regex(r"[1-8][0-9]{2}-[0-9]{2}-[0-9]{4}", fullmatch=True),
    "ipv4": st.builds(
        lambda parts: ".".join(map(str, parts)),
        st.tuples(*[st.integers(min_value=1, max_value=255)] * 4),
    ),
    "email": st.builds(
        lambda u, d: f"{u}@{d}.com", _chars(string.ascii_lowercase, 6), _chars("abcdef", 5)
    ),
}
SECRET_KINDS = {"aws_access_key", "github", "openai", "slack", "jwt", "private_key"}
SURROUNDINGS = {
    "letters": st.text(alphabet=string.ascii_letters, min_size=1, max_size=6),
    "token=": st.just("token="),
    "punctuation": st.text(alphabet="=:;,'\"()[]{}<>/\\|!?#$%&*", min_size=1, max_size=4),
    "multibyte": st.text(alphabet="éü東京🔑ß", min_size=1, max_size=4),
    "line break": st.sampled_from(["\n", "\r\n", "\n\n"]),
    "nothing": st.just(""),
    "digits": st.text(alphabet=string.digits, min_size=1, max_size=4),
}


def raw_fragments(kind: str, value: str) -> list[str]:
    """What must never be seen: the value minus its last character and, for a
    secret, every 12-character window of it."""
    fragments = [value[:-1]]
    if kind in SECRET_KINDS:
        fragments += [value[i : i + 12] for i in range(len(value) - 11)]
    return fragments


def assert_no_fragment(kind: str, value: str, *seen: str) -> None:
    for text in seen:
        for fragment in raw_fragments(kind, value):
            assert fragment not in text, (kind, value, fragment, text)


def default_redactor() -> Redactor:
    policy = load_policy("builtin:default", env={})
    return policy.redactor  # type: ignore[attr-defined, no-any-return]


def stream_through(redactor: Redactor, text: str, size: int) -> tuple[str, list[str]]:
    session = redactor.session()
    pieces = [session.push(text[i : i + size])[0] for i in range(0, len(text), size)]
    pieces.append(session.flush()[0])
    return "".join(pieces), pieces


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # many detectors x surroundings x splits
@given(data=st.data())
def test_no_raw_fragment_whatever_surrounds_the_value_or_cuts_it(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(VALUES)), label="kind")
    value = data.draw(VALUES[kind], label="value")
    # Digits too: glued to a number they make the end ambiguous, and the
    # longer span is redacted.
    before = data.draw(SURROUNDINGS[data.draw(st.sampled_from(sorted(SURROUNDINGS)))])
    after = data.draw(SURROUNDINGS[data.draw(st.sampled_from(sorted(SURROUNDINGS)))])
    size = data.draw(st.integers(min_value=1, max_value=8), label="token size")
    text = before + value + after
    redactor = default_redactor()
    whole, _ = redactor.redact_all(text)  # what unary returns
    streamed, pieces = stream_through(redactor, text, size)
    assert streamed == whole
    assert_no_fragment(kind, value, whole, *pieces)


GLUED = {
    "aws": "xAKIAIOSFODNN7EXAMPLEy",
    "aws token=": "token=AKIAIOSFODNN7EXAMPLEend",
    "github": "xghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789y",
    "openai": "xsk-proj-Abcdefghijklmnopqrstuvwxyz0123456789y",
    "slack": "tokenxoxb-123456789012-ABCDEFGHIJKLMNOPQRSTend",
    "jwt": "xeyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9Py",
    "iban": "ibanGB82WEST12345698765432end",
    "phone": "call+14155550134now",
}
GLUED_VALUES = {
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "aws token=": "AKIAIOSFODNN7EXAMPLE",
    "github": "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    "openai": "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789",
    "slack": "xoxb-123456789012-ABCDEFGHIJKLMNOPQRST",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9P",
    "iban": "GB82WEST12345698765432",
    "phone": "+14155550134",
}


def echo(text: str, size: int, **fields: object) -> pb.StreamRespondRequest:
    fields.setdefault("chunking", pb.Chunking(max_tokens_per_chunk=1))
    fields.setdefault("labels", {"tokenwire.sim/echo-token-chars": str(size)})
    return stream_request(text, model="echo", **fields)


@pytest.fixture
async def default_policy(start_server: StartServer):
    return await start_server(policy="builtin:default")


@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("name", sorted(GLUED))
async def test_glued_values_leave_neither_stream_nor_unary(
    default_policy, name: str, size: int
) -> None:
    text = f"The value {GLUED[name]} was written glued."
    value = GLUED_VALUES[name]
    kind = "payment_card" if name == "phone" else "jwt"  # both: check secret windows
    events = await collect(default_policy.stub.StreamRespond(echo(text, size)))
    chunks, completed = chunks_of(events), completed_of(events)
    assert_no_fragment(kind, value, completed.final_text, *(c.text for c in chunks))
    assert completed.verdict == pb.VERDICT_REDACTED
    unary = await default_policy.stub.Respond(
        pb.RespondRequest(model="echo", messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)])
    )
    assert_no_fragment(kind, value, unary.completed.final_text)
    assert unary.completed.final_text == completed.final_text


def test_look_alikes_stay_untouched() -> None:
    redactor = default_redactor()
    for text in (
        "Order 4111 1111 1111 1112 shipped.",  # fails Luhn
        # Fails mod-97. (Written in groups, its 14-digit tail would be redacted
        # as a phone number: a digit count a phone can have, so fail closed.)
        "IBAN GB82WEST12345698765433 is wrong",
        "released on 2024-01-15 at 10:30",  # a date, not a phone number
        "version 1.2.3.4.5 of the tool",  # not an address
        "ASIA is a continent and AKIA is a prefix",  # prefix without a key body
    ):
        assert redactor.redact_all(text)[0] == text


def test_a_glued_neighbour_that_could_belong_to_the_value_is_redacted_with_it() -> None:
    redactor = default_redactor()
    for text in (
        "0(415) 555-0134A",  # a trunk digit glued to the area code
        "1 415-555-0134",  # a country code
        "(415) 555-0134 12",  # an extension
        "415 555 0134 2024",
        "+44 20 7946 0958 1234 56",  # more than 15 digits after a +
    ):
        out, _ = redactor.redact_all(f"call {text}!")
        assert out in ("call [PHONE]!", "call [PAYMENT_CARD]!", "call [PHONE]A!"), out
    out, _ = redactor.redact_all("key AKIAIOSFODNN7EXAMPLEXYZ here")
    assert out == "key [AWS_ACCESS_KEY] here"
    out, _ = redactor.redact_all("iban GB82WEST12345698765432XYZ1 here")
    assert out == "iban [IBAN] here"


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx1Q2w3e4r5t6y7u8i9o0\n"),
        ("payment_card", "4111 1111 1111"),
        ("openai", "sk-proj-Abcdefghijklmnop"),
        ("aws_access_key", "AKIAIOSFODNN"),
    ],
)
def test_a_value_cut_off_by_the_end_of_the_text_is_redacted(kind: str, value: str) -> None:
    redactor = default_redactor()
    for size in range(1, 9):
        streamed, pieces = stream_through(redactor, f"here: {value}", size)
        assert_no_fragment(kind, value, streamed, *pieces)
        assert streamed.startswith("here: [")


async def test_max_tokens_inside_a_key_block_never_releases_it(default_policy) -> None:
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "b3BlbnNzaC1rZXktdjEAAAAA\n" * 6
    text = "Here is the key:\n" + key + "-----END OPENSSH PRIVATE KEY-----\nDone."
    for size in (1, 4, 8):
        max_tokens = (len("Here is the key:\n") + len(key) // 2) // size
        request = echo(text, size, params=pb.GenerationParams(max_tokens=max_tokens))
        events = await collect(default_policy.stub.StreamRespond(request))
        completed = completed_of(events)
        assert completed.finish_reason == pb.FINISH_REASON_LENGTH
        streamed = "".join(c.text for c in chunks_of(events))
        assert_no_fragment("private_key", key, streamed, completed.final_text)
        assert "[PRIVATE_KEY]" in completed.final_text
        unary = await default_policy.stub.Respond(
            pb.RespondRequest(
                model="echo",
                messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)],
                params=pb.GenerationParams(max_tokens=len(text) // 2),
                labels={"tokenwire.sim/echo-token-chars": "1"},
            )
        )
        assert_no_fragment("private_key", key, unary.completed.final_text)


async def test_a_cancelled_stream_releases_nothing_it_held(default_policy) -> None:
    key = "AKIAIOSFODNN7EXAMPLE"
    request = echo(
        f"start {key[:10]}" + "X" * 40,
        1,
        labels={"tokenwire.sim/echo-token-chars": "1", "tokenwire.sim/inter-token-ms": "20"},
    )
    call = default_policy.stub.StreamRespond(request)
    seen: list[str] = []
    async for event in call:
        seen.append(event.chunk.text)
        if "".join(seen).startswith("start "):
            call.cancel()
            break
    assert key[:10] not in "".join(seen)


CATASTROPHIC_POLICY = """
id: slow
version: "1"
redact:
  - id: runs
    pattern: '(a|aa)+$'
"""


async def test_a_catastrophic_rule_fails_closed_and_other_calls_keep_their_latency(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "slow.yaml"
    path.write_text(CATASTROPHIC_POLICY)
    server = await start_server(policy=str(path))
    health = health_pb2_grpc.HealthStub(server.channel)
    await health.Check(health_pb2.HealthCheckRequest())
    latencies: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            latencies.append(time.perf_counter() - started)

    prober = asyncio.create_task(probe())
    text = "a" * 60 + "b then more text"
    results = await asyncio.gather(
        *(collect(server.stub.StreamRespond(echo(text, 61))) for _ in range(4))
    )
    stop.set()
    await prober
    for events in results:
        completed = completed_of(events)
        streamed = "".join(c.text for c in chunks_of(events))
        assert "a" * 12 not in streamed and "a" * 12 not in completed.final_text
        assert completed.verdict == pb.VERDICT_REDACTED
        assert [(a.rule_id, a.entity_type) for a in completed.actions] == [("runs", "RULE_TIMEOUT")]
    # One budget per response (10 ms), never the seconds the pattern would take.
    assert latencies and max(latencies) < 0.25, sorted(latencies)[-5:]


@pytest.mark.parametrize(
    ("pattern", "position"),
    [("(a+)+", 4), ("x(\\\\w+\\\\s?)*y", 9), ("(?:[a-z]*,)+$", 11), ("(a{2,})+", 7)],
)
def test_nested_unbounded_quantifiers_are_refused_with_file_rule_and_position(
    tmp_path: Path, pattern: str, position: int
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f'id: x\nversion: 1\nredact:\n  - id: r\n    pattern: "{pattern}"\n')
    with pytest.raises(PolicyError) as raised:
        load_policy(str(path), env={})
    message = str(raised.value)
    assert str(path) in message and "redact[0]" in message
    assert f"catastrophic pattern at position {position}" in message


def test_atomic_and_bounded_repeats_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "id: x\nversion: 1\nredact:\n"
        "  - id: a\n    pattern: '(?>a+)+b'\n"
        "  - id: b\n    pattern: '(ab{1,3})+'\n"
        "  - id: c\n    pattern: '(a++)+'\n"
    )
    load_policy(str(path), env={})


def test_an_invalid_pattern_names_its_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("id: x\nversion: 1\nflag:\n  - id: f\n    pattern: 'ab(c'\n")
    with pytest.raises(PolicyError, match=r"flag\[0\]: bad pattern at position 4"):
        load_policy(str(path), env={})


@pytest.mark.parametrize(
    "content",
    [
        "id: x\nversion: 1\nredact:\n  - detector: [1, 2]\n",
        "id: x\nversion: 1\nredact:\n  - detector: email\n    operator: [mask]\n",
        "id: x\nversion: 1\nredact: 5\n",
        "id: x\nversion: 1\nmax_holdback_chars: lots\n",
        "id: x\nversion: 1\n1: x\n",
        "id: x\nversion: 1\nredact:\n  - id: r\n    pattern: a\n    entity_type: [A]\n",
    ],
)
def test_wrongly_typed_fields_are_policy_errors(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(PolicyError, match=str(path)):
        load_policy(str(path), env={})


async def test_serve_exits_2_on_a_catastrophic_rule(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("id: x\nversion: 1\nblock:\n  - id: b\n    pattern: '(x+y?)*z'\n")
    process = await asyncio.create_subprocess_exec(
        *("tokenwire", "serve", "--port", "0", "--policy", str(path), "--audit-path", ":memory:"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    assert b"block[0]: catastrophic pattern at position 6" in err
    assert b"Traceback" not in err


PATHOLOGICAL: list[Callable[[int], str]] = [
    lambda n: "a" * n,
    lambda n: "1" * n,
    lambda n: "1 " * (n // 2),
    lambda n: "a@" * (n // 2),
    lambda n: "a.b" * (n // 3) + "@",
    lambda n: "1." * (n // 2),
    lambda n: "+1" * (n // 2),
    lambda n: "-----BEGIN PRIVATE KEY-----" + "A" * n,
    lambda n: "eyJ" + "a." * (n // 2),
    lambda n: "AKIA" * (n // 4),
    lambda n: "sk-" * (n // 3),
    lambda n: "Bearer " * (n // 7),
    lambda n: "GB82 " * (n // 5),
]


@pytest.mark.parametrize("name", sorted(BUILTIN_DETECTORS))
def test_builtin_detectors_stay_inside_the_budget_on_pathological_text(name: str) -> None:
    """Built-ins skip the per-call timer (it costs more than their scans), so
    each is shown linear enough on the worst text the hold-back cap allows."""
    detector = BUILTIN_DETECTORS[name]
    overlapped = detector.validate is not None  # as the redaction session scans
    for make in PATHOLOGICAL:
        text = make(2048)
        list(
            detector.pattern.finditer(
                text, partial=True, overlapped=overlapped, timeout=MATCH_BUDGET_SECONDS
            )
        )


def test_a_timed_out_rule_in_a_session_redacts_everything_it_held() -> None:
    slow = load_policy("builtin:default", env={})
    assert isinstance(slow.policy_id, str)
    rule = RedactionRule(
        "runs",
        BUILTIN_DETECTORS["email"].__class__(
            "runs",
            "RUNS",
            regex.compile(r"(a|aa)+$", regex.VERSION1),
            budget=MATCH_BUDGET_SECONDS,
        ),
        Operator.REPLACE,
    )
    session = Redactor((rule,), None, 2048).session()
    out = [session.push("ok " + "a" * 60)[0], session.push("b and then the rest")[0]]
    out.append(session.flush()[0])
    assert "".join(out) == "ok [RULE_TIMEOUT]"
    assert session.timed_out == "runs"


def test_iban_lengths_reject_a_valid_checksum_at_the_wrong_length() -> None:
    redactor = default_redactor()
    value = _iban("GB", "WEST1234569876543")  # 21 characters, GB needs 22
    assert redactor.redact_all(f"x {value} y")[0] == f"x {value} y"


async def test_grpc_status_of_a_normal_call_is_unaffected(default_policy) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(default_policy.stub.StreamRespond(stream_request(messages=[])))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_error_messages_details_and_logs_never_quote_a_value(
    default_policy, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that quotes caller input (an unknown model name here; upstream
    bodies the same way) is scrubbed before it leaves: message, ErrorInfo
    metadata, BadRequest descriptions, trailers and log lines."""
    from google.rpc import error_details_pb2, status_pb2

    key = "AKIAIOSFODNN7EXAMPLE"
    caplog.set_level("DEBUG")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await default_policy.stub.Respond(
            pb.RespondRequest(
                model=f"x{key}y",
                messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")],
            )
        )
    error = raised.value
    seen = [error.details() or ""]
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            seen.append(status.message)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(info):
                    seen.extend(info.metadata.values())
                elif detail.Unpack(bad):
                    seen.extend(v.description for v in bad.field_violations)
        elif isinstance(value, str):
            seen.append(value)
    seen.extend(record.getMessage() for record in caplog.records)
    assert_no_fragment("aws_access_key", key, *seen)
    assert any("[AWS_ACCESS_KEY]" in text for text in seen)


def test_scrubbing_filter_cleans_messages_and_tracebacks() -> None:
    import logging

    from tokenwire_server.governance.scrub import ScrubbingFilter

    token = "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
    try:
        raise ValueError(f"upstream echoed {token}")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, "f", 1, "saw %s", (token,), sys.exc_info())
    assert ScrubbingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert_no_fragment("github", token, text)
    assert "[API_TOKEN]" in text and "Traceback" in text


@pytest.mark.parametrize("fault", ["fail-after", "raise-after"])
async def test_an_upstream_failure_inside_a_value_releases_none_of_it(
    default_policy, fault: str
) -> None:
    """The call ends with a status; what governance held for the value is dropped."""
    key = "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
    text = f"Here: {key} and more"
    request = echo(
        text,
        2,
        labels={"tokenwire.sim/echo-token-chars": "2", f"tokenwire.sim/{fault}": "12"},
    )
    received: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in default_policy.stub.StreamRespond(request):
            received.append(event.chunk.text)
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert_no_fragment("github", key, "".join(received), raised.value.details() or "")
    assert "".join(received) == "Here: "


async def test_caller_ids_labels_and_model_names_never_reach_logs_spans_or_metrics_raw(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The request id, the labels and a refused model name are the caller's free
    text: logs, span attributes, metric labels and error details carry them
    scrubbed, whatever the response's policy."""
    import json

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import generate_latest

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    audit_path = tmp_path / "audit.sqlite3"
    server = await start_server(tracer_provider=provider, audit_path=str(audit_path))
    key = "AKIAIOSFODNN7EXAMPLE"
    email = "jane.doe@example.com"
    caplog.set_level("DEBUG")
    completed_of(
        await collect(
            server.stub.StreamRespond(
                stream_request(request_id=f"req-{email}", labels={f"k{key}": f"v{key}w"})
            )
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(server.stub.StreamRespond(stream_request(model=f"m{key}")))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await collect(server.stub.StreamRespond(stream_request(labels={f"{key}{'x' * 200}": "v"})))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    logged = [json.dumps(record.__dict__, default=str) for record in caplog.records]
    spans = [json.dumps(dict(span.attributes or {})) for span in exporter.get_finished_spans()]
    metrics = generate_latest(server.server.metrics.registry).decode()
    trailers = [str(v) for v in invalid.value.trailing_metadata() or ()]
    from tokenwire_server.audit.reader import read_records

    audited = json.dumps(read_records(audit_path, limit=100), default=str)
    assert '"refused"' in audited and '"completed"' in audited
    everything = [*logged, *spans, metrics, *trailers, invalid.value.details() or "", audited]
    assert_no_fragment("aws_access_key", key, *everything)
    assert_no_fragment("email", email, *everything)
    assert any("[EMAIL]" in text for text in logged)


SLOW_ECHO = {"tokenwire.sim/echo-token-chars": "1", "tokenwire.sim/inter-token-ms": "5"}
HALF_KEY_TEXT = "start AKIAIOSFODNN7EXAMPLE and more text after it " + "pad " * 40


def seen_text(events: list[pb.StreamRespondResponse]) -> str:
    return "".join(
        e.chunk.text if e.HasField("chunk") else e.completed.final_text
        for e in events
        if e.HasField("chunk") or e.HasField("completed")
    )


async def read_until_error(call: object) -> tuple[list[pb.StreamRespondResponse], grpc.StatusCode]:
    events: list[pb.StreamRespondResponse] = []
    try:
        async for event in call:  # type: ignore[attr-defined]
            events.append(event)
    except grpc.aio.AioRpcError as error:
        return events, error.code()
    return events, grpc.StatusCode.OK


async def test_a_deadline_inside_a_value_releases_none_of_it(default_policy) -> None:
    """The deadline lands while the key is half generated (one character per
    10 ms: the key runs from about 60 to 260 ms): what the caller saw holds
    no fragment of it."""
    labels = {**SLOW_ECHO, "tokenwire.sim/inter-token-ms": "10"}
    request = echo(HALF_KEY_TEXT, 1, labels=labels)
    events, code = await read_until_error(default_policy.stub.StreamRespond(request, timeout=0.15))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_fragment("aws_access_key", "AKIAIOSFODNN7EXAMPLE", seen_text(events))


@pytest.mark.parametrize("stop", ["ODNN", "7EXA", "MPLE"])
async def test_a_stop_sequence_inside_a_value_releases_none_of_it(
    default_policy, stop: str
) -> None:
    key = "AKIAIOSFODNN7EXAMPLE"
    text = f"the key {key} is here"
    for size in (1, 3, 8):
        request = echo(text, size, params=pb.GenerationParams(stop=[stop]))
        events = await collect(default_policy.stub.StreamRespond(request))
        completed = completed_of(events)
        assert completed.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
        assert_no_fragment("aws_access_key", key, seen_text(events))
        assert key[:4] not in seen_text(events), (stop, size, seen_text(events))


async def test_a_drain_inside_a_value_releases_none_of_it(start_server: StartServer) -> None:
    server = await start_server(policy="builtin:default", grace_period=0.05)
    call = server.stub.StreamRespond(echo(HALF_KEY_TEXT, 1, labels=SLOW_ECHO))
    events: list[pb.StreamRespondResponse] = []
    async for event in call:
        events.append(event)
        if "AKIA" in HALF_KEY_TEXT[: len(seen_text(events)) + 8]:
            break  # the key is being generated now
    draining = asyncio.ensure_future(server.server.drain())
    more, _ = await read_until_error(call)
    await draining
    assert_no_fragment("aws_access_key", "AKIAIOSFODNN7EXAMPLE", seen_text(events + more))


async def test_a_resumed_replay_carries_only_governed_text(default_policy) -> None:
    key = "AKIAIOSFODNN7EXAMPLE"
    request = echo(HALF_KEY_TEXT, 1, labels=SLOW_ECHO, resumable=True)
    first = default_policy.stub.StreamRespond(request)
    events: list[pb.StreamRespondResponse] = []
    async for event in first:
        events.append(event)
        if len(events) == 8:
            break
    first.cancel()
    response_id = events[0].chunk.response_id
    after = events[-1].chunk.sequence
    rest = await collect(
        default_policy.stub.StreamRespond(
            pb.StreamRespondRequest(
                resume=pb.ResumeFrom(response_id=response_id, after_sequence=after)
            )
        )
    )
    replay = await collect(
        default_policy.stub.StreamRespond(
            pb.StreamRespondRequest(resume=pb.ResumeFrom(response_id=response_id))
        )
    )
    completed = completed_of(replay)
    assert "[AWS_ACCESS_KEY]" in completed.final_text
    assert_no_fragment("aws_access_key", key, seen_text(events + rest), seen_text(replay))
    assert seen_text(replay) == seen_text(chunks_only(events + rest)) + completed.final_text


def chunks_only(events: list[pb.StreamRespondResponse]) -> list[pb.StreamRespondResponse]:
    return [e for e in events if e.HasField("chunk")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_scrubbing_skips_only_text_that_holds_no_value(data: st.DataObject) -> None:
    """`scrub` returns text at once when it holds nothing any detector needs;
    it must agree with a full redaction on every text, values or not."""
    from tokenwire_server.governance.scrub import EVERYTHING, scrub

    full = EVERYTHING.redactor

    kind = data.draw(st.sampled_from(sorted(VALUES)), label="kind")
    value = data.draw(VALUES[kind], label="value")
    cut = data.draw(st.integers(min_value=1, max_value=len(value)), label="cut")
    around = st.text(alphabet=string.printable + "é東", max_size=12)
    text = data.draw(around) + value[:cut] + data.draw(around)
    assert scrub(text) == full.redact_all(text)[0]
    noise = data.draw(st.text(alphabet=string.printable, max_size=40), label="noise")
    assert scrub(noise) == full.redact_all(noise)[0]


def _every_split_agrees(text: str) -> str:
    """The whole-text answer, checked equal to the stream at every token size 1-8."""
    redactor = default_redactor()
    whole, _ = redactor.redact_all(text)
    for size in range(1, 9):
        assert stream_through(redactor, text, size)[0] == whole, (text, size)
    return whole


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("Meeting 2024-01-15 (415) 555-0134 ok", ["(415) 555-0134"]),
        ("Meeting 2024-01-15 415-555-0134 ok", ["415-555-0134"]),
        ("v2.0 415-555-0134 ok", ["415-555-0134"]),
        ("0.5 415.555.0134 ok", ["415.555.0134"]),
        ("1 2 415-555-0134 ok", ["415-555-0134"]),
        ("call (415) 555-0134 (650) 555-0199 ok", ["(415) 555-0134", "(650) 555-0199"]),
        ("call 415.555.0134 650.555.0199 ok", ["415.555.0134", "650.555.0199"]),
        ("SSN 123-45-6789-01 ok", ["123-45-6789"]),
        ("SSN 123-45-6789-1 ok", ["123-45-6789"]),
        ("ID 1-123-45-6789 ok", ["123-45-6789"]),
        ("cards 4111 1111 1111 1111 5555 5555 5555 4444 ok", ["5555 5555 5555 4444"]),
    ],
)
def test_numbers_next_to_other_numbers_are_still_found(text: str, values: list[str]) -> None:
    """A digit group before or after a value (a date, a version, a second
    number in a list) neither hides it nor lets part of it out."""
    whole = _every_split_agrees(text)
    for value in values:
        assert_no_fragment("payment_card", value, whole)
    assert whole.endswith(" ok")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("key ops@example.comsk-abcdefghijklmnopqrstuvwx ok", "sk-abcdefghijklmnopqrstuvwx"),
        ("ops@example.comGB82WEST12345698765432 ok", "GB82WEST12345698765432"),
        ("AKIAIOSFODNN7EXAMPLEBearer abcdefghijklmnopqrstuvwxyz ok", "abcdefghijklmnopqrstuvwxyz"),
        ("ops@example.comghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 ok", "ghp_aBcDeFgHiJkLmNoPqRsTu"),
    ],
)
def test_overlapping_values_are_one_span(text: str, secret: str) -> None:
    """Where one value's tail is another's start, their union is redacted."""
    whole = _every_split_agrees(text)
    assert_no_fragment("jwt", secret, whole)
    assert whole.endswith("] ok")


def test_a_case_folded_prefix_split_across_tokens_is_held() -> None:
    for text in (
        "a@b.com_Bearer abcdefghijklmnopqrstuvwxyz ok",
        "x BEarer abcdefghijklmnopqrstuvwxyz ok",
    ):
        whole = _every_split_agrees(text)
        assert "abcdefghijkl" not in whole and whole.endswith("[BEARER_TOKEN] ok")


@pytest.mark.parametrize(
    "text",
    [
        "card 411111111111111",  # 15 of 16 digits: fails Luhn only because it is cut
        "card 4111 1111 1111 11",
        "iban GB82WEST1234569876543",  # one character short of its country's length
        "tel (415) 555-0",
        "tel (415) 555-01",
    ],
)
def test_a_cut_off_value_that_fails_its_checksum_is_still_redacted(text: str) -> None:
    whole = _every_split_agrees(text)
    value = text.split(" ", 1)[1]
    assert value[:-1] not in whole and whole.endswith("]")


JWT_LONG = (
    "eyJhbGciOiJIUzI1NiJ9."
    + "eyJzdWIiOiIxMjM0NTY3ODkwIn0" * 170
    + ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I"
)


@pytest.mark.parametrize(
    ("text", "tail"),
    [
        (f"token: {JWT_LONG} ok", JWT_LONG[-40:]),
        ("x" * 2100 + "john.smith@example.com ok", "john.smith@example.com"),
        ("Authorization: Bearer " + "A" * 2500 + "SECRETTAIL ok", "SECRETTAIL"),
        ("sk-" + "b" * 3000 + "TAILOFTHEKEY ok", "TAILOFTHEKEY"),
    ],
)
def test_past_the_hold_back_cap_no_part_of_the_value_leaks(text: str, tail: str) -> None:
    """A value longer than `max_holdback_chars` is cut at the cap: the held
    part is redacted and the rest of it (to the next whitespace) is dropped."""
    redactor = default_redactor()
    for size in (1, 7, 64):
        streamed, _ = stream_through(redactor, text, size)
        assert tail not in streamed and streamed.endswith("] ok"), (size, streamed[-80:])
    assert tail not in redactor.redact_all(text)[0]


@pytest.mark.parametrize(
    ("text", "value"),
    [("card 4111111111111111 ok", "4111111111111111"), ("tel (415) 555-0134 ok", "(415) 555-0134")],
)
async def test_max_tokens_inside_a_checksummed_value_never_releases_it(
    default_policy, text: str, value: str
) -> None:
    """Through the server: `max_tokens` ends the answer a few characters into
    the value, stream and unary alike."""
    cut = text.index(value) + len(value) - 2
    for size in (1, 3):
        request = echo(text, size, params=pb.GenerationParams(max_tokens=-(-cut // size)))
        events = await collect(default_policy.stub.StreamRespond(request))
        completed = completed_of(events)
        assert completed.finish_reason == pb.FINISH_REASON_LENGTH
        streamed = "".join(c.text for c in chunks_of(events))
        for seen in (streamed, completed.final_text):
            assert value[: len(value) - 4] not in seen, seen


def test_a_json_value_that_ended_whole_is_not_a_value_cut_off() -> None:
    """A closed JSON string or a number its delimiter ended is complete: ten
    digits there are not a card under way, nor is `sk-abcd` a key; a key block
    missing its END line still is one (its body is the key). Cut off by the
    end of the response, the same fragments are redacted."""
    from tokenwire_server.structured.json_governance import JsonGovernanceSession

    policy = load_policy("builtin:default", env={})

    def governed(document: str) -> str:
        session = JsonGovernanceSession(policy)
        out, _ = session.push(document)
        tail, _, decision = session.finish()
        return decision.text if decision.text is not None else out + tail

    whole = '{"n": 1234567890, "id": "order 1234567890123", "k": "sk-abcd", "t": 1733328000001}'
    assert governed(whole) == whole
    key = '{"key": "-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEAx1Q2w3e4r5t6y7u8i9o0"}'
    assert governed(key) == '{"key": "[PRIVATE_KEY]"}'
    assert "4111111111" not in governed('{"cut": "card 411111111111')
    assert "4111111111" not in governed('{"cut": 411111111111')


@pytest.mark.parametrize(
    "text",
    [
        "Released on 2024-06-30.",
        "Order 48213 was placed on 2023-11-02 and shipped 2023-11-05.",
        "See pages 120-135",
        "The winning numbers were 12 18 23 35 41 47 52",
        "scores 60 77 67 53",
        "ISBN 978-3-16-148410-0 ok",
        "On 2024-03-15 12345678 shipped",
        "pages 2024-01-15 123-456 of the log",
        "Table: 2024 03 15 123 4567 done",
    ],
)
def test_numbers_that_are_no_value_stay_untouched_even_at_the_end(text: str) -> None:
    """Dates, page ranges, ISBNs and lists of small numbers are left alone,
    mid-text and as the last words of a response (where a value under way
    would be redacted), at every token size."""
    assert _every_split_agrees(text) == text


def test_round_numbers_in_exponent_form_stay_numbers() -> None:
    """A long run of zeros holds no card (no card number starts with 0)."""
    from tokenwire_server.structured.json_governance import JsonGovernanceSession

    policy = load_policy("builtin:default", env={})
    document = (
        '{"a": 1e16, "b": 1e18, "c": 2.5e17, "d": 6.022e23, "e": 1.2e+20, "f": 100000000000000000}'
    )
    session = JsonGovernanceSession(policy)
    out, _ = session.push(document)
    tail, _, decision = session.finish()
    assert (decision.text if decision.text is not None else out + tail) == document
