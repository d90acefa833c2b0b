"""JSON governance with the real policies: secrets inside strings (and keys,
and numbers) are redacted whatever the escapes and however the text is cut
into pushes; the output stays valid JSON; action spans are UTF-8 byte
positions of the replacements in the output; blocks, rewrites and text that
is not JSON behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_governance import POLICY_YAML
from tokenwire_server.domain import Action, Verdict
from tokenwire_server.governance.policy import (
    FinalDecision,
    GovernanceSession,
    PassThroughPolicy,
    Policy,
)
from tokenwire_server.governance.policy_file import load_policy
from tokenwire_server.structured.json_governance import JsonGovernanceSession

DEFAULT = load_policy("builtin:default")


def run(policy: Policy, pieces: list[str]) -> tuple[str, list[Action], FinalDecision]:
    session = JsonGovernanceSession(policy)
    out: list[str] = []
    actions: list[Action] = []
    for piece in pieces:
        released, acts = session.push(piece)
        out.append(released)
        actions += acts
    tail, acts, decision = session.finish()
    return "".join(out) + tail, actions + list(acts), decision


def splits(text: str) -> list[list[str]]:
    """Whole, every 1/2/3/7 characters, and every cut in two."""
    cuts = [[text], *([text[i : i + n] for i in range(0, len(text), n)] for n in (1, 2, 3, 7))]
    cuts += [[text[:i], text[i:]] for i in range(1, len(text))]
    return cuts


def spans(text: str, actions: list[Action]) -> list[str]:
    raw = text.encode()
    return [raw[a.start : a.end].decode() for a in actions]


CASES = [
    ('{"to": "bob@example.com", "n": 1}', {"to": "[EMAIL]", "n": 1}),
    # An escape cannot hide the @ from the email rule.
    ('{"x": "ops\\u0040example.com"}', {"x": "[EMAIL]"}),
    # A redaction right after \n leaves the escape whole.
    ('{"note": "line\\nbob@example.com\\t"}', {"note": "line\n[EMAIL]\t"}),
    ('{"q": "say \\"bob@example.com\\""}', {"q": 'say "[EMAIL]"'}),
    # A UTF-16 pair is one character; non-ASCII stays as it is.
    ('{"e": "\\ud83d\\ude00 é carol@example.org"}', {"e": "😀 é [EMAIL]"}),
    # Keys are governed too.
    ('{"bob@example.com": [1, 2.5e3, null, true]}', {"[EMAIL]": [1, 2500.0, None, True]}),
    # A card number as a JSON number becomes a string holding the replacement.
    ('{"card": 4111111111111111, "ok": false}', {"card": "[PAYMENT_CARD]", "ok": False}),
    ('["a", {"b": ["10.0.0.12", "fine"]}]', ["a", {"b": ["[IPV4]", "fine"]}]),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_secrets_in_json_are_redacted_and_the_json_stays_valid(text: str, expected: object) -> None:
    results = set()
    for pieces in splits(text):
        out, actions, decision = run(DEFAULT, pieces)
        assert json.loads(out) == expected, (pieces, out)
        assert decision.verdict is Verdict.REDACTED and decision.text is None
        assert all(s.startswith("[") and s.endswith("]") for s in spans(out, actions)), out
        assert [(a.start, a.end) for a in actions] == [(a.start, a.end) for a in decision.actions]
        results.add(out)
    assert len(results) == 1


def test_clean_json_passes_byte_for_byte() -> None:
    text = '{ "a" : [1, -0.5, 1e-3, true, null], "b": "caf\\u00e9 \\/ \\\\" }'
    for pieces in splits(text):
        out, actions, decision = run(DEFAULT, pieces)
        assert json.loads(out) == json.loads(text)
        assert not actions and decision.verdict is Verdict.ALLOWED


def test_a_lone_surrogate_becomes_a_replacement_character() -> None:
    out, _, _ = run(DEFAULT, ['["\\ud83d x", "\\ude00"]'])
    assert json.loads(out) == ["\ufffd x", "\ufffd"]
    out.encode()  # has a UTF-8 form


def test_text_that_is_not_json_is_governed_as_plain_text() -> None:
    for text, expected in [
        ("Sure! Mail bob@example.com", "Sure! Mail [EMAIL]"),
        ('{"a": 1} then bob@example.com', '{"a": 1} then [EMAIL]'),
        ('{"a": "x\\q bob@example.com"}', '{"a": "x\\q [EMAIL]"}'),
        ("12 bob@example.com", "12 [EMAIL]"),
        ("+1 415-555-0134", "[PHONE]"),
    ]:
        for pieces in splits(text):
            out, actions, decision = run(DEFAULT, pieces)
            assert out == expected, pieces
            assert spans(out, actions) == ["[EMAIL]" if "@" in text else "[PHONE]"]
            assert decision.verdict is Verdict.REDACTED


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Policy:
    monkeypatch.setenv("TOKENWIRE_POLICY_HASH_KEY", "k" * 32)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML)
    return load_policy(str(path))


def test_a_blocked_term_inside_a_string_blocks_and_halts(acme: Policy) -> None:
    text = '{"plan": "project nightingale starts", "more": "x"}'
    for pieces in splits(text):
        session = JsonGovernanceSession(acme)
        released = "".join(session.push(p)[0] for p in pieces)
        assert session.halted
        assert "nightingale" not in released
        _, _, decision = session.finish()
        assert decision.blocked and decision.verdict is Verdict.BLOCKED
        assert decision.text == "Blocked by acme policy."


def test_flags_and_final_blocks_see_each_string(acme: Policy) -> None:
    out, _, decision = run(acme, ['{"a": "the diagnosis is", "b": "EMP-123456"}'])
    assert decision.review_required and decision.verdict is Verdict.REDACTED
    assert json.loads(out)["b"].startswith("[EMPLOYEE_ID:")
    flagged = [a for a in decision.actions if a.rule_id == "medical"]
    assert spans(out, flagged) == ["diagnosis"]
    _, _, blocked = run(acme, ['{"a": "the launch codes"}'])
    assert blocked.blocked and blocked.text == "Blocked by acme policy."


class _Upper(GovernanceSession):
    """Releases nothing while streaming and rewrites the whole text at the end."""

    def __init__(self) -> None:
        self.seen = ""

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        self.seen += text
        return text, ()

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        if "secret" in self.seen:
            return "", (), FinalDecision(Verdict.REDACTED, text=self.seen.upper())
        return "", (), FinalDecision(Verdict.ALLOWED)


class UpperPolicy(Policy):
    policy_id = "upper"
    policy_version = "1"

    def open_session(self) -> GovernanceSession:
        return _Upper()


def test_a_rewrite_at_the_end_rebuilds_the_final_json() -> None:
    out, _, decision = run(UpperPolicy(), ['{"a": "x", "b": "a \\"secret\\"", "c": "y"}'])
    assert json.loads(out) == {"a": "x", "b": 'a "secret"', "c": "y"}
    assert decision.text is not None
    assert json.loads(decision.text) == {"a": "x", "b": 'A "SECRET"', "c": "y"}


def test_the_pass_through_policy_changes_nothing() -> None:
    text = '{"a": ["bob@example.com", 4111111111111111]}'
    out, actions, decision = run(PassThroughPolicy(), [text])
    assert out == text and not actions and decision.verdict is Verdict.ALLOWED
