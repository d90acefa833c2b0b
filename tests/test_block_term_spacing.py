"""A multi-word block term is blocked whatever stands between its words.

Between the words of a `terms:` entry any run of whitespace (no-break, thin,
ideographic space, tabs, line breaks) or invisible characters (zero-width
space and joiners, word joiner, BOM, soft hyphen) counts as the gap, and a
term's edges look past invisible characters. Streamed in tokens of any size
the answer equals the whole-text one, and the term is never released. A
hyphen is a different spelling: it is listed as a term of its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import StartServer, chunks_of, collect, completed_of, stream_request
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import Verdict
from tokenwire_server.governance.pattern_safety import nested_unbounded_quantifier
from tokenwire_server.governance.policy_file import PolicyError, build_policy, load_policy
from tokenwire_server.governance.redaction import Redactor
from tokenwire_server.governance.rules_policy import RulesPolicy

REFUSAL = "Blocked by acme policy."
POLICY_YAML = f"""
id: acme-spacing
version: "1"
refusal_text: "{REFUSAL}"
block:
  - id: codename
    terms: ["project nightingale"]
flag:
  - id: follow-up
    terms: ["follow up"]
"""

#: Gaps a plain single space used to stand for; none of them was blocked.
GAPS = {
    "two spaces": "  ",
    "no-break space": "\u00a0",
    "tab": "\t",
    "newline": "\n",
    "CRLF": "\r\n",
    "thin space": "\u2009",
    "narrow no-break space": "\u202f",
    "ideographic space": "\u3000",
    "line separator": "\u2028",
    "next line": "\x85",
    "mixed run": " \t\u00a0\n\u2003 ",
    "zero-width space": "\u200b",
    "space + zero-width space": " \u200b ",
    "zero-width joiner": "\u200d",
    "zero-width non-joiner": "\u200c",
    "word joiner": "\u2060",
    "BOM": "\ufeff",
    "soft hyphen": "\u00ad",
}
#: Every gap character of the Basic Multilingual Plane, and a tag character.
_GAP_CHARS = [c for c in map(chr, range(0x10000)) if regex.match(r"[\s\p{DI}]", c, regex.V1)] + [
    "\U000e0020"
]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML, encoding="utf-8")
    return path


def _policy(path: Path) -> RulesPolicy:
    policy = load_policy(str(path), env={})
    assert isinstance(policy, RulesPolicy)
    return policy


def stream_through(redactor: Redactor, text: str, size: int) -> tuple[str, list[str], bool]:
    """What a stream releases in tokens of `size` chars, each piece, and whether it blocked."""
    session = redactor.session()
    pieces = [session.push(text[i : i + size])[0] for i in range(0, len(text), size)]
    pieces.append(session.flush()[0])
    return "".join(pieces), pieces, session.blocked_by is not None


def assert_blocked_at_every_token_size(redactor: Redactor, text: str) -> None:
    whole, _ = redactor.redact_all(text)
    assert "nightingale" not in whole.lower()
    for size in range(1, 9):
        streamed, pieces, blocked = stream_through(redactor, text, size)
        assert blocked, (size, text)
        assert streamed == whole, (size, text)
        for piece in pieces:
            assert "nightingale" not in piece.lower(), (size, text, piece)
        # Nothing from the start of the term on is released either.
        assert text.startswith(streamed) and "project" not in streamed.lower(), (size, streamed)


@pytest.mark.parametrize("gap", GAPS.values(), ids=GAPS.keys())
def test_any_whitespace_or_invisible_gap_between_words_is_blocked(
    policy_file: Path, gap: str
) -> None:
    redactor = _policy(policy_file).redactor
    assert_blocked_at_every_token_size(redactor, f"Opening words. Project{gap}Nightingale is next.")
    assert_blocked_at_every_token_size(redactor, f"project{gap}NIGHTINGALE")  # ends on the term


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gap=st.text(alphabet=st.sampled_from(_GAP_CHARS), min_size=1, max_size=6).filter(
        lambda gap: gap != " "
    ),
    before=st.sampled_from(["", "A ", "Intro, ", "x\u200b ", "(", "\u200d"]),
    after=st.sampled_from(["", ".", " and more", "\u200b!", "\n"]),
)
def test_streaming_equals_whole_text_for_any_gap(gap: str, before: str, after: str) -> None:
    spec = {"id": "p", "version": 1, "block": [{"id": "b", "terms": ["project nightingale"]}]}
    redactor = build_policy(spec, "inline", {}).redactor
    assert_blocked_at_every_token_size(redactor, f"{before}Project{gap}Nightingale{after}")


def test_a_gap_split_across_tokens_is_held_not_released(policy_file: Path) -> None:
    session = _policy(policy_file).redactor.session()
    released = [session.push(piece)[0] for piece in ("Say ", "Project", " \u00a0", "\t", "\u200b")]
    assert "".join(released) == "Say "  # the word and the gap so far are held
    assert session.held_chars == len("Project \u00a0\t\u200b")
    assert session.push("Night")[0] == "" and session.blocked_by is None
    assert session.push("ingale now")[0] == ""
    assert session.blocked_by is not None and session.blocked_by.rule_id == "codename"
    # A gap that turns out not to lead to the term is released as it was.
    other = _policy(policy_file).redactor.session()
    assert other.push("Project \u00a0\t")[0] == ""
    assert other.push("plan")[0] == "Project \u00a0\tplan"
    assert other.flush()[0] == "" and other.blocked_by is None


def test_invisible_characters_at_the_edges_neither_hide_nor_glue_the_term(
    policy_file: Path,
) -> None:
    redactor = _policy(policy_file).redactor
    for text in (
        "\u200dProject Nightingale",  # a joiner before the term hid it (\\w)
        "Say \u200cproject\u00a0nightingale\u200d now",
        "\u3164project nightingale",  # Hangul filler: a letter that renders as nothing
        "project nightingale\u200d",
    ):
        assert_blocked_at_every_token_size(redactor, text)
    # Still whole words: a visible letter glued on, through invisible ones or not.
    for text in (
        "xproject nightingale",
        "x\u200dproject nightingale",
        "project nightingales",
        "project nightingale\u200bs",
        "project-nightingale",  # a hyphen is a different spelling
    ):
        for size in range(1, 9):
            streamed, _, blocked = stream_through(redactor, text, size)
            assert not blocked and streamed == text, (text, size)


def test_terms_in_the_policy_are_split_on_any_gap_and_hyphens_listed_apart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        'id: p\nversion: 1\nblock:\n  - id: b\n    terms: ["  project\\u00a0\\t nightingale ",'
        ' "blue-bird"]\n',
        encoding="utf-8",
    )
    redactor = _policy(path).redactor
    assert_blocked_at_every_token_size(redactor, "The Project Nightingale plan")
    assert redactor.session().push("a blue-bird sings")[0] == "a "
    assert redactor.redact_all("a blue bird sings")[0] == "a blue bird sings"


def test_a_term_with_no_word_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        'id: p\nversion: 1\nblock:\n  - id: b\n    terms: ["ok", " \\u200b\\t"]\n', encoding="utf-8"
    )
    with pytest.raises(PolicyError, match=r"block\[0\]: term .* has no word"):
        load_policy(str(path), env={})


def test_the_generated_pattern_is_linear_and_passes_the_safety_check(policy_file: Path) -> None:
    policy = _policy(policy_file)
    (rule,) = policy.redactor.rules
    pattern = rule.detector.pattern
    assert nested_unbounded_quantifier(pattern.pattern) is None
    # A long gap still blocks; pathological text stays far inside the budget.
    redactor = policy.redactor
    out, _ = redactor.redact_all("project" + " \u00a0\t" * 500 + "nightingale")
    assert out == ""
    for text in ("project " * 2_000, "project" + " " * 20_000 + "x", "\u200d" * 20_000 + "p"):
        started = time.perf_counter()
        session = redactor.session()
        session.push(text)
        session.flush()
        assert session.timed_out is None
        assert time.perf_counter() - started < 2.0


def test_flag_terms_match_across_any_gap_too(policy_file: Path) -> None:
    session = _policy(policy_file).open_session()
    released, _ = session.push("Please follow\u00a0\n up tomorrow.")
    tail, _, decision = session.finish()
    assert released + tail == "Please follow\u00a0\n up tomorrow."
    assert decision.verdict is Verdict.ALLOWED and decision.review_required


# Through the real server: the echo model streams the text back in tokens of
# `echo-token-chars` characters, governed by the policy file.


def echo(text: str, token_chars: int) -> pb.StreamRespondRequest:
    return stream_request(
        text,
        model="echo",
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/echo-token-chars": str(token_chars)},
    )


@pytest.fixture
async def governed(start_server: StartServer, policy_file: Path):
    return await start_server(policy=str(policy_file))


@pytest.mark.parametrize("token_chars", [1, 2, 3, 5, 8])
async def test_server_blocks_the_term_with_odd_spacing_before_anything_is_sent(
    governed, token_chars: int
) -> None:
    text = "Project\u00a0 \u2009Nightingale is the plan."
    events = await collect(governed.stub.StreamRespond(echo(text, token_chars)))
    chunks, completed = chunks_of(events), completed_of(events)
    assert [c.text for c in chunks] == [REFUSAL]
    assert completed.verdict == pb.VERDICT_BLOCKED
    assert completed.finish_reason == pb.FINISH_REASON_POLICY_BLOCKED
    assert completed.final_text == REFUSAL
    assert [(a.rule_id, a.operator) for a in completed.actions] == [
        ("codename", pb.GOVERNANCE_OPERATOR_BLOCK)
    ]


@pytest.mark.parametrize("gap", ["  ", "\n", "\u3000", "\u200b", " \t\u2060 "])
@pytest.mark.parametrize("token_chars", [2, 7])
async def test_server_never_sends_the_term_mid_stream_and_retracts(
    governed, gap: str, token_chars: int
) -> None:
    text = "Safe opening words that stream out first. " * 2 + f"Then project{gap}nightingale leaks."
    events = await collect(governed.stub.StreamRespond(echo(text, token_chars)))
    chunks, completed = chunks_of(events), completed_of(events)
    streamed = "".join(c.text for c in chunks)
    assert streamed and text.startswith(streamed)
    for chunk in chunks:
        assert "nightingale" not in chunk.text.lower()
    assert "nightingale" not in streamed.lower() and "project" not in streamed.lower()
    assert completed.verdict == pb.VERDICT_BLOCKED
    assert completed.verification.status == pb.VERIFICATION_STATUS_DIVERGED
    assert completed.final_text == REFUSAL
    assert governed.simulator.stats.finished == 0
