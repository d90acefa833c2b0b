"""Streaming-safe redaction: nothing a rule would redact is ever released.

The session keeps a cursor between generated and released text. On every
push it scans the unreleased tail with each rule's pattern in partial mode:
complete matches are rewritten (overlapping ones as one span, their union);
a match that reaches the end of the text (it could still grow, or it is only
the start of a possible match) holds back exactly the characters from its
start, and they are released as soon as the next token shows they cannot
complete. A hard cap on held characters forces a decision so the stream
never stalls: the held text is redacted (fail closed), and the rest of the
value is suppressed too, until its end marker (private key blocks) or the
next whitespace. When the response ends, a held fragment that is already a
value under way (a key block without its END line, half a card number) is
redacted, never flushed raw; a text that ended whole (a closed JSON string)
has no value under way but a key block.

Every match runs under a time budget (`MATCH_BUDGET_SECONDS`), so a rule that
backtracks catastrophically cannot hold the event loop: the session fails
closed instead (everything unreleased is redacted, nothing more is released,
and the action names the rule with entity type `RULE_TIMEOUT`).

The budget applies to the policy's own patterns. The built-in detectors are
fixed, bounded patterns (tests run each against pathological input under the
same budget) and skip it: the `regex` module's timeout costs about 2.5 us per
call, more than most of their scans.

Spans in the actions are UTF-8 byte positions of the replacement text in the
final payload, which, for released text, is exactly what the chunks carry.

Why one module: the hold-back cursor, partial matching and the hard cap are
one algorithm over one buffer; split, the invariant "nothing redactable is
released" would span files.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import regex

from tokenwire_server.domain import Action, Operator, utf8_length
from tokenwire_server.governance.detectors import Detector

#: Released characters kept as context so lookbehind assertions see across cuts.
CONTEXT_CHARS = 16
#: The entity type of the action that records a rule which ran out of time.
TIMEOUT_ENTITY = "RULE_TIMEOUT"
#: A custom rule's trailing fragment this long is treated as a value under way.
MIN_BEGUN_CHARS = 4
#: Where a value cut at the hold-back cap is taken to end (one with no end marker).
_WHITESPACE = regex.compile(r"\s")


@dataclass(frozen=True, slots=True)
class RedactionRule:
    rule_id: str
    detector: Detector
    operator: Operator


class Redactor:
    """The immutable, shareable part: rules, operators and the hash key."""

    def __init__(
        self, rules: tuple[RedactionRule, ...], hash_key: bytes | None, max_holdback: int
    ) -> None:
        self.rules = rules
        self.hash_key = hash_key
        self.max_holdback = max_holdback

    def replacement(self, rule: RedactionRule, value: str) -> str:
        """The text that stands in for a value; never the value itself."""
        entity = rule.detector.entity_type
        if rule.operator is Operator.MASK:
            return "*" * len(value)
        if rule.operator is Operator.HASH:
            assert self.hash_key is not None
            digest = hmac.new(self.hash_key, value.encode(), hashlib.sha256).hexdigest()
            return f"[{entity}:{digest[:12]}]"
        return f"[{entity}]"

    def session(self) -> RedactionSession:
        return RedactionSession(self)

    def redact_all(self, text: str) -> tuple[str, tuple[Action, ...]]:
        """The whole-text answer the streaming session must agree with."""
        session = self.session()
        out, actions = session.push(text)
        tail, tail_actions = session.flush()
        return out + tail, actions + tail_actions


class RuleTimeout(Exception):
    """A rule used up its time budget; the session fails closed."""

    def __init__(self, rule: RedactionRule | None) -> None:
        super().__init__(rule.rule_id if rule is not None else "*")
        self.rule = rule


@dataclass(slots=True)
class _Match:
    start: int
    end: int
    rule: RedactionRule


class RedactionSession:
    """Per-response state: the held tail and how many bytes were released."""

    __slots__ = (
        "_context",
        "_continuing",
        "_held",
        "_redactor",
        "_released_bytes",
        "blocked_by",
        "timed_out",
    )

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held = ""
        self._context = ""
        self._released_bytes = 0
        self._continuing: RedactionRule | None = None
        #: The block rule that stopped this response; nothing is released after it.
        self.blocked_by: RedactionRule | None = None
        #: The rule id that ran out of time ("*" when the combined search did);
        #: everything unreleased was redacted and nothing is released after it.
        self.timed_out: str | None = None

    @property
    def held_chars(self) -> int:
        return len(self._held)

    @property
    def halted(self) -> bool:
        return self.blocked_by is not None or self.timed_out is not None

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        if self.halted:
            return "", ()
        self._held += text
        return self._guarded_scan(final=False)

    def flush(self, complete: bool = False) -> tuple[str, tuple[Action, ...]]:
        """End of the text: decide on everything still held. `complete`: the
        text ended whole (a closed JSON string), not cut off (see `_candidates`)."""
        if self.halted:
            return "", ()
        return self._guarded_scan(final=True, complete=complete)

    def _guarded_scan(self, final: bool, complete: bool = False) -> tuple[str, tuple[Action, ...]]:
        try:
            return self._scan(final, complete)
        except RuleTimeout as timeout:
            return self._fail_closed(timeout.rule)

    def _fail_closed(self, rule: RedactionRule | None) -> tuple[str, tuple[Action, ...]]:
        """Replaces every unreleased character with one marker and stops releasing."""
        self.timed_out = rule.rule_id if rule is not None else "*"
        marker = f"[{TIMEOUT_ENTITY}]"
        start = self._released_bytes
        self._released_bytes += len(marker)
        self._held = ""
        action = Action(
            rule_id=self.timed_out,
            entity_type=TIMEOUT_ENTITY,
            operator=Operator.REPLACE,
            start=start,
            end=start + len(marker),
        )
        return marker, (action,)

    def _scan(self, final: bool, complete: bool = False) -> tuple[str, tuple[Action, ...]]:
        buffer = self._context + self._held
        start = len(self._context)
        if self._continuing is not None:
            if self._continuing.detector.end_marker is not None:
                start = self._consume_until_end_marker(buffer, start, final)
            else:
                start = self._consume_rest_of_value(buffer, start)
            if self._continuing is not None:
                return "", ()
        matches, hold_from, hold_rule = self._find(buffer, start, final, complete)
        if not final and len(buffer) - hold_from > self._redactor.max_holdback:
            assert hold_rule is not None
            matches = [m for m in matches if m.end <= hold_from]
            matches.append(_Match(hold_from, len(buffer), hold_rule))
            # The value goes on past the cap: what follows is suppressed until
            # its end marker (a key block) or, for any other value, the next
            # whitespace, so the rest of a long token never leaks.
            self._continuing = hold_rule
            hold_from = len(buffer)
        return self._emit(buffer, start, matches, hold_from)

    def _consume_rest_of_value(self, buffer: str, start: int) -> int:
        """Drops the rest of a value cut at the cap, up to the next whitespace."""
        stop = _WHITESPACE.search(buffer, start)
        end = len(buffer) if stop is None else stop.start()
        # The dropped text stays the context lookbehinds see, as in the whole text.
        self._context = buffer[max(0, end - CONTEXT_CHARS) : end]
        self._held = buffer[end:]
        if stop is not None:
            self._continuing = None
        return end

    def _consume_until_end_marker(self, buffer: str, start: int, final: bool) -> int:
        rule = self._continuing
        assert rule is not None and rule.detector.end_marker is not None
        try:
            match = rule.detector.end_marker.search(
                buffer, start, partial=not final, timeout=rule.detector.budget
            )
        except TimeoutError as error:
            raise RuleTimeout(rule) from error
        if match is not None and not match.partial:
            self._continuing = None
            self._held = buffer[match.end() :]
            self._context = ""
            return match.end()
        keep_from = match.start() if match is not None else len(buffer)
        if final:
            keep_from = len(buffer)
        self._held = buffer[keep_from:]
        self._context = ""
        return keep_from

    def _find(
        self, buffer: str, start: int, final: bool, complete: bool = False
    ) -> tuple[list[_Match], int, RedactionRule | None]:
        end = len(buffer)
        region = buffer[start:]
        hold_from, hold_rule = end, None
        found: list[tuple[int, int, int, RedactionRule]] = []
        for index, rule in enumerate(self._redactor.rules):
            gate = rule.detector.gate
            if gate is not None and gate.search(region) is None:
                continue
            try:
                held = _candidates(rule, index, buffer, start, final, complete, found)
            except TimeoutError as error:
                raise RuleTimeout(rule) from error
            if held < hold_from:
                hold_from, hold_rule = held, rule
        found.sort(key=lambda f: (f[0], f[1], f[2]))
        selected: list[_Match] = []
        for m_start, negative_length, _, rule in found:
            m_end = m_start - negative_length
            if selected and m_start < selected[-1].end:
                # Values that overlap (`ops@example.comsk-...`: an email whose
                # last label starts a key) are one span, their union, so no
                # tail of either leaks; a block among them wins.
                last = selected[-1]
                last.end = max(last.end, m_end)
                if rule.operator is Operator.BLOCK:
                    last.rule = rule
                continue
            selected.append(_Match(m_start, m_end, rule))
        for chosen in selected:
            if chosen.start < hold_from < chosen.end:
                hold_from, hold_rule = chosen.start, chosen.rule
        return [m for m in selected if m.end <= hold_from], hold_from, hold_rule

    def _emit(
        self, buffer: str, start: int, matches: list[_Match], hold_from: int
    ) -> tuple[str, tuple[Action, ...]]:
        if not matches:
            released = buffer[start:hold_from]
            actions: tuple[Action, ...] = ()
        else:
            parts: list[str] = []
            found: list[Action] = []
            offset = self._released_bytes
            cursor = start
            for match in matches:
                plain = buffer[cursor : match.start]
                parts.append(plain)
                offset += utf8_length(plain)
                if match.rule.operator is Operator.BLOCK:
                    # Nothing from the blocked match on ever leaves.
                    self.blocked_by = match.rule
                    hold_from = len(buffer)
                    cursor = match.start
                    break
                replacement = self._redactor.replacement(
                    match.rule, buffer[match.start : match.end]
                )
                size = utf8_length(replacement)
                found.append(
                    Action(
                        rule_id=match.rule.rule_id,
                        entity_type=match.rule.detector.entity_type,
                        operator=match.rule.operator,
                        start=offset,
                        end=offset + size,
                    )
                )
                parts.append(replacement)
                offset += size
                cursor = match.end
            if self.blocked_by is None:
                parts.append(buffer[cursor:hold_from])
            released = "".join(parts)
            actions = tuple(found)
        self._released_bytes += utf8_length(released)
        self._held = buffer[hold_from:]
        self._context = (self._context + buffer[start:hold_from])[-CONTEXT_CHARS:]
        return released, actions


def _candidates(
    rule: RedactionRule,
    index: int,
    buffer: str,
    start: int,
    final: bool,
    complete: bool,
    found: list[tuple[int, int, int, RedactionRule]],
) -> int:
    """Adds the rule's complete matches to `found`; returns the earliest start
    of a match that more text could still change (the end when none). At the
    end of a text cut off (`final`, not `complete`), a value the end is inside
    counts as one; at the end of a whole text only a key block without its END
    line does."""
    end = len(buffer)
    pattern = rule.detector.pattern
    validate = rule.detector.validate
    budget = rule.detector.budget
    held = end
    # Overlapped where a checksum decides: a candidate that fails validation
    # (a 19-digit run failing Luhn) must not hide a valid match starting
    # inside it, or the answer would depend on where a token boundary fell.
    # Elsewhere the leftmost match is the one kept, and overlapped scanning
    # would be quadratic on repetitive text ("sk-sk-sk-...").
    for match in pattern.finditer(
        buffer, start, partial=True, overlapped=validate is not None, timeout=budget
    ):
        m_start, m_end = match.span()
        if m_start == end:
            continue
        if final:
            if match.partial:
                whole = pattern.fullmatch(buffer, m_start, timeout=budget)
                if whole is None:
                    # The response ended inside this match: a value under way
                    # is redacted whole, a mere start of one is released.
                    if _begun(rule, buffer[m_start:], complete):
                        found.append((m_start, -(end - m_start), index, rule))
                    continue
        # Not final yet: a match that reaches the end, or that more text
        # could still extend ("GB82 WEST 1234" + " 5698 ..."), stays held.
        elif match.partial or pattern.fullmatch(buffer, m_start, end, partial=True, timeout=budget):
            held = min(held, m_start)
            continue
        if validate is not None and not validate(match.group()):
            cut = rule.detector.cut
            if final and not complete and m_end == end and cut and cut.search(match.group()):
                # The response ended inside it (15 digits of a card, an IBAN
                # one character short): its checksum cannot tell, so fail closed.
                found.append((m_start, -(end - m_start), index, rule))
            continue
        found.append((m_start, -(m_end - m_start), index, rule))
    return held


def _begun(rule: RedactionRule, fragment: str, complete: bool = False) -> bool:
    """Whether a fragment the text ended inside is a value already under way.

    A block rule's fragment is not its term, so it is released; in a whole
    text (`complete`) only a key block's is one (its END line is missing, its
    body is the key); else a built-in detector says when its fragment counts,
    and a custom rule's counts once it is `MIN_BEGUN_CHARS` long."""
    if rule.operator is Operator.BLOCK:
        return False
    if complete:
        return (
            rule.detector.end_marker is not None
            and rule.detector.begun is not None
            and (rule.detector.begun.search(fragment) is not None)
        )
    begun = rule.detector.begun
    if begun is None:
        return len(fragment) >= MIN_BEGUN_CHARS
    return begun.search(fragment) is not None
