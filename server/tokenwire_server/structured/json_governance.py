"""Governance of JSON text (tool arguments, JSON output) that keeps it JSON.

A policy's rules are written for text; run over raw JSON they would see
escapes (`\\u0040` hides the `@` of an email from a pattern) and could cut
through one (a redaction after `\\n` leaves a lone backslash: invalid JSON).
So a small incremental lexer passes the structure outside strings through,
and the *decoded* content of every string goes through a fresh session of the
policy (pushed as it streams, finished at the closing quote) and is encoded
again (`json.dumps(...)[1:-1]`, non-ASCII kept). Keys are governed like
values: they are model output too, and a key is as good a hiding place for an
email as a value. A number goes through a session of its own once complete
(a card number is a number too); when the policy changes it, it becomes a
JSON string holding the replacement, so the JSON stays valid. A number whose
value is an integer is governed as that integer's plain decimal digits first
(`4.111111111111111e15`, `4111111111111111.0` and `41111111111111.11e2` are
all the card 4111111111111111), found by exact string arithmetic, never
float; one with more than `MAX_INTEGER_DIGITS` digits (`1e999999`) is no
value any rule matches and is only governed as written.

Escapes split across pushes wait for their last character; a UTF-16 pair
(`\\ud83d\\ude00`) is one character; a lone surrogate becomes U+FFFD (it has
no UTF-8 form). Text that turns out not to be JSON (a character no JSON can
hold outside a string, a bad escape) is governed from there on as plain text
by one session, so nothing escapes governance by not being JSON.

Actions carry UTF-8 byte positions in the governed output. The decision
aggregates the sessions: the worst verdict, review when any asked, blocked
when any blocked (the final text is then that session's refusal, and the
session halts). Limits: a rule sees one string at a time, so a pattern
split across two strings (`["bob@", "example.com"]`) is not matched.

Why one module: the lexer's states and the mapping of each inner session's
positions into the output are one algorithm over one output cursor.
"""

from __future__ import annotations

import json
import re

from tokenwire_server.domain import Action, Verdict, utf8_length
from tokenwire_server.governance.policy import FinalDecision, GovernanceSession, Policy

_SPECIAL = re.compile(r'["\\]')
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')
_NUMBER = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([+-]?)([0-9]+))?")
#: The most digits an integer-valued number is expanded to for the rules: past
#: any card (27 glued digits), phone or ID a detector matches.
MAX_INTEGER_DIGITS = 64
_STRUCTURE = frozenset(" \t\r\n{}[],:")
_BARE = frozenset("0123456789+-.eEtrufalsn")
_LITERALS = frozenset({"true", "false", "null"})
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r"}
_SIMPLE_ESCAPES["t"] = "\t"
_HEX = frozenset("0123456789abcdefABCDEF")
_REPLACEMENT = "\ufffd"


def encode(content: str) -> str:
    """String content as it stands between the quotes of a JSON string."""
    if _NEEDS_ESCAPE.search(content) is None:
        return content
    return json.dumps(content, ensure_ascii=False)[1:-1]


def integer_digits(number: re.Match[str]) -> str | None:
    """The plain decimal form (`-` and digits) of a `_NUMBER` match whose
    value is an integer of at most `MAX_INTEGER_DIGITS` digits, else None.
    Exact and linear in the number's length: digits are moved, never
    multiplied out, and an exponent too long to matter is not parsed."""
    sign, whole, fraction, exponent_sign, exponent = number.groups(default="")
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return "0"  # -0.0e7 is the integer 0
    significant = digits.rstrip("0")
    exponent = exponent.lstrip("0")
    if len(exponent) > 18:
        # |exponent| >= 10**18, more than any token has digits to absorb it:
        # a huge integer or a fraction, neither a value a rule matches.
        return None
    scale = int(exponent or "0") * (-1 if exponent_sign == "-" else 1)
    scale += len(digits) - len(significant) - len(fraction)
    if scale < 0 or len(significant) + scale > MAX_INTEGER_DIGITS:
        return None
    return sign + significant + "0" * scale


def _byte_to_char(text: str, position: int) -> str:
    """The prefix of `text` that is `position` UTF-8 bytes long."""
    return text.encode()[:position].decode("utf-8", "ignore")


class JsonGovernanceSession(GovernanceSession):
    """A `GovernanceSession` for JSON text over any policy."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.halted = False
        self._out: list[str] = []  # this push's output
        self._acts: list[Action] = []  # this push's actions
        self._parts: list[str] = []  # everything released, for a rewrite at the end
        self._out_bytes = 0
        self._inner: GovernanceSession | None = None  # the open string's session
        self._plain: GovernanceSession | None = None  # after the text proved not JSON
        self._start = 0  # output byte where the open string's (or plain) content began
        self._start_part = 0
        self._decoded: list[str] = []  # the open string's released, decoded content
        self._escaped = False  # some of it needed escaping
        self._escape = ""  # an escape under way, from its backslash
        self._high = ""  # a high surrogate waiting for its low half
        self._bare = ""  # a number or literal under way
        self._verdict = Verdict.ALLOWED
        self._review = False
        self._final_actions: list[Action] = []
        self._shift = 0  # final minus streamed bytes, from rewrites so far
        self._rewrites: list[tuple[int, int, str]] = []
        self._blocked: FinalDecision | None = None

    # -- GovernanceSession ----------------------------------------------------

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        if self.halted or not text:
            return "", ()
        self._out, self._acts = [], []
        self._lex(text)
        return "".join(self._out), tuple(self._acts)

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        self._out, self._acts = [], []
        if not self.halted:
            if self._inner is not None:
                if self._escape:
                    self._content(self._escape)  # an escape cut off: keep what came
                self._flush_high()
                self._close_string(quote=False)
            elif self._bare:
                self._complete_bare("", complete=complete)
            if self._plain is not None and not self.halted:
                tail, acts, decision = self._plain.finish()
                self._emit_plain(tail, acts)
                self._conclude(decision, "".join(self._parts[self._start_part :]), plain=True)
        tail, acts = "".join(self._out), tuple(self._acts)
        if self._blocked is not None:
            blocked = self._blocked
            return (
                tail,
                acts,
                FinalDecision(
                    Verdict.BLOCKED, blocked.text, blocked.actions, self._review, blocked=True
                ),
            )
        text = None
        if self._rewrites:
            parts = list(self._parts)
            for first, last, replacement in reversed(self._rewrites):
                parts[first:last] = [replacement]
            text = "".join(parts)
        return (
            tail,
            acts,
            FinalDecision(self._verdict, text, tuple(self._final_actions), self._review),
        )

    # -- the lexer ------------------------------------------------------------

    def _lex(self, text: str) -> None:
        i, n = 0, len(text)
        while i < n and not self.halted:
            if self._plain is not None:
                released, acts = self._plain.push(text[i:])
                self._emit_plain(released, acts)
                self._check_halt(self._plain)
                return
            if self._inner is not None:
                i = self._in_string(text, i)
                continue
            char = text[i]
            if char in _BARE:
                self._bare += char
            elif char in _STRUCTURE or char == '"':
                if self._bare and not self._complete_bare(text[i:]):
                    return
                self._emit(char)
                if char == '"':
                    self._open_string()
            else:
                self._fall_back(self._bare + text[i:])
                self._bare = ""
                return
            i += 1

    def _in_string(self, text: str, i: int) -> int:
        if self._escape:
            return self._escape_char(text, i)
        match = _SPECIAL.search(text, i)
        end = len(text) if match is None else match.start()
        if end > i:
            self._flush_high()
            self._content(text[i:end])
        if match is None or self.halted:
            return len(text)
        if text[end] == '"':
            self._flush_high()
            self._close_string(quote=True)
        else:
            self._escape = "\\"
        return end + 1

    def _escape_char(self, text: str, i: int) -> int:
        char = text[i]
        self._escape += char
        if len(self._escape) == 2:
            if char in _SIMPLE_ESCAPES:
                self._escape = ""
                self._flush_high()
                self._content(_SIMPLE_ESCAPES[char])
            elif char != "u":
                self._not_json_in_string(text[i + 1 :])
                return len(text)
        elif char not in _HEX:
            self._not_json_in_string(text[i + 1 :])
            return len(text)
        elif len(self._escape) == 6:
            code = int(self._escape[2:], 16)
            self._escape = ""
            if 0xD800 <= code < 0xDC00:
                self._flush_high()
                self._high = chr(code)
            elif 0xDC00 <= code < 0xE000 and self._high:
                pair = (ord(self._high) - 0xD800) * 0x400 + (code - 0xDC00) + 0x10000
                self._high = ""
                self._content(chr(pair))
            else:
                self._flush_high()
                self._content(_REPLACEMENT if 0xDC00 <= code < 0xE000 else chr(code))
        return i + 1

    def _flush_high(self) -> None:
        if self._high:
            self._high = ""
            self._content(_REPLACEMENT)

    def _not_json_in_string(self, rest: str) -> None:
        """A bad escape: the string so far is governed and closed as it is;
        the escape and everything after go to the plain session."""
        escape, self._escape = self._escape, ""
        self._flush_high()
        self._close_string(quote=False)
        if not self.halted:
            self._fall_back(escape + rest)

    # -- strings, numbers, plain text ---------------------------------------------

    def _open_string(self) -> None:
        self._inner = self._policy.open_session()
        self._start, self._start_part = self._out_bytes, len(self._parts)
        self._decoded, self._escaped = [], False

    def _content(self, decoded: str) -> None:
        if self._inner is None:  # a halt closed the string
            return
        released, acts = self._inner.push(decoded)
        self._emit_content(released, acts)
        self._check_halt(self._inner)

    def _emit_content(self, released: str, acts: tuple[Action, ...]) -> None:
        if released:
            self._decoded.append(released)
            encoded = encode(released)
            if encoded is not released:
                self._escaped = True
            self._emit(encoded)
        if acts:
            self._acts.extend(self._mapped(acts, "".join(self._decoded), self._start))

    def _close_string(self, *, quote: bool) -> None:
        inner, self._inner = self._inner, None
        if inner is None:  # a halt closed it already
            return
        tail, acts, decision = inner.finish(quote)  # a closing quote ends it whole
        self._emit_content(tail, acts)
        content = "".join(self._decoded)
        self._conclude(decision, content, plain=False)
        if quote and not self.halted:
            self._emit('"')

    def _complete_bare(self, rest: str, complete: bool = True) -> bool:
        """A number or literal ended (by a delimiter, or `complete` False: by
        the end of the response); False when it was not JSON (the rest then
        went to the plain session) or a rule blocked."""
        token, self._bare = self._bare, ""
        if token in _LITERALS:
            self._emit(token)
            return True
        number = _NUMBER.fullmatch(token)
        if number is None:
            self._fall_back(token + rest)
            return False
        # Its value first (the integer a rule would see if the model had
        # written it plainly), then its text as written.
        forms = [token]
        integer = integer_digits(number)
        if integer is not None and integer != token:
            forms.insert(0, integer)
        for text in forms:
            session = self._policy.open_session()
            released, acts = session.push(text)
            tail, tail_acts, decision = session.finish(complete)
            if decision.blocked:
                self._block(decision)
                return False
            governed = decision.text if decision.text is not None else released + tail
            self._verdict = max(self._verdict, decision.verdict)
            self._review = self._review or decision.review_required
            if governed == text and not (acts or tail_acts or decision.actions):
                continue
            start = self._out_bytes + 1
            mapped = self._mapped(decision.actions or acts + tail_acts, governed, start)
            self._emit(json.dumps(governed, ensure_ascii=False))
            self._acts.extend(mapped)
            self._final_actions.extend(self._shifted(mapped))
            return True
        self._emit(token)
        return True

    def _fall_back(self, rest: str) -> None:
        self._plain = self._policy.open_session()
        self._start, self._start_part = self._out_bytes, len(self._parts)
        released, acts = self._plain.push(rest)
        self._emit_plain(released, acts)
        self._check_halt(self._plain)

    def _emit_plain(self, released: str, acts: tuple[Action, ...]) -> None:
        self._emit(released)
        self._acts.extend(
            Action(a.rule_id, a.entity_type, a.operator, a.start + self._start, a.end + self._start)
            for a in acts
        )

    # -- decisions and positions ------------------------------------------------------

    def _conclude(self, decision: FinalDecision, streamed: str, *, plain: bool) -> None:
        """One inner session's decision joins the aggregate; its actions land in
        final-text positions, and a rewrite replaces its part of the text."""
        if decision.blocked:
            self._block(decision)
            return
        self._verdict = max(self._verdict, decision.verdict)
        self._review = self._review or decision.review_required
        content = decision.text if decision.text is not None else streamed
        if plain:
            mapped = [
                Action(
                    a.rule_id, a.entity_type, a.operator, a.start + self._start, a.end + self._start
                )
                for a in decision.actions
            ]
        else:
            mapped = self._mapped(decision.actions, content, self._start)
        self._final_actions.extend(self._shifted(mapped))
        if decision.text is not None and decision.text != streamed:
            replacement = decision.text if plain else encode(decision.text)
            self._rewrites.append((self._start_part, len(self._parts), replacement))
            old = utf8_length("".join(self._parts[self._start_part :]))
            self._shift += utf8_length(replacement) - old

    def _shifted(self, actions: list[Action]) -> list[Action]:
        if not self._shift:
            return actions
        s = self._shift
        return [
            Action(a.rule_id, a.entity_type, a.operator, a.start + s, a.end + s) for a in actions
        ]

    def _mapped(self, acts: tuple[Action, ...], content: str, start: int) -> list[Action]:
        """Positions in decoded `content` -> positions in the output, where the
        content is encoded from byte `start` on."""
        if not self._escaped and _NEEDS_ESCAPE.search(content) is None:
            return [
                Action(a.rule_id, a.entity_type, a.operator, a.start + start, a.end + start)
                for a in acts
            ]

        def at(position: int) -> int:
            return start + utf8_length(encode(_byte_to_char(content, position)))

        return [Action(a.rule_id, a.entity_type, a.operator, at(a.start), at(a.end)) for a in acts]

    def _check_halt(self, session: GovernanceSession) -> None:
        if not session.halted or self.halted:
            return
        if session is self._inner:
            self._close_string(quote=False)
        else:
            _, _, decision = session.finish()
            self._conclude(decision, "".join(self._parts[self._start_part :]), plain=True)
        self.halted = True

    def _block(self, decision: FinalDecision) -> None:
        self._review = self._review or decision.review_required
        if self._blocked is None:
            self._blocked = decision
        self.halted = True

    def _emit(self, piece: str) -> None:
        if piece:
            self._out.append(piece)
            self._parts.append(piece)
            self._out_bytes += utf8_length(piece)
