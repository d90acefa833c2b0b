"""Streaming-safe redaction: nothing a rule would redact is ever released.

The session keeps a cursor between generated and released text. On every
push it scans the unreleased tail with each rule's pattern in partial mode:
complete matches are rewritten; a match that reaches the end of the text (it
could still grow, or it is only the start of a possible match) holds back
exactly the characters from its start, and they are released as soon as the
next token shows they cannot complete. A hard cap on held characters forces
a decision so the stream never stalls: the held text is redacted (fail
closed), and a rule with an end marker (private key blocks) keeps suppressing
until the marker arrives.

Spans in the actions are UTF-8 byte positions of the replacement text in the
final payload, which, for released text, is exactly what the chunks carry.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from tokenwire_server.domain import Action, Operator, utf8_length
from tokenwire_server.governance.detectors import Detector

#: Released characters kept as context so lookbehind assertions see across cuts.
CONTEXT_CHARS = 16


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


@dataclass(slots=True)
class _Match:
    start: int
    end: int
    rule: RedactionRule


class RedactionSession:
    """Per-response state: the held tail and how many bytes were released."""

    __slots__ = ("_context", "_continuing", "_held", "_redactor", "_released_bytes", "blocked_by")

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held = ""
        self._context = ""
        self._released_bytes = 0
        self._continuing: RedactionRule | None = None
        #: The block rule that stopped this response; nothing is released after it.
        self.blocked_by: RedactionRule | None = None

    @property
    def held_chars(self) -> int:
        return len(self._held)

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        if self.blocked_by is not None:
            return "", ()
        self._held += text
        return self._scan(final=False)

    def flush(self) -> tuple[str, tuple[Action, ...]]:
        """End of generation: decide on everything still held."""
        if self.blocked_by is not None:
            return "", ()
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, tuple[Action, ...]]:
        buffer = self._context + self._held
        start = len(self._context)
        if self._continuing is not None:
            start = self._consume_until_end_marker(buffer, start, final)
            if self._continuing is not None:
                return "", ()
        matches, hold_from, hold_rule = self._find(buffer, start, final)
        if not final and len(buffer) - hold_from > self._redactor.max_holdback:
            assert hold_rule is not None
            matches = [m for m in matches if m.end <= hold_from]
            matches.append(_Match(hold_from, len(buffer), hold_rule))
            if hold_rule.detector.end_marker is not None:
                self._continuing = hold_rule
            hold_from = len(buffer)
        return self._emit(buffer, start, matches, hold_from)

    def _consume_until_end_marker(self, buffer: str, start: int, final: bool) -> int:
        rule = self._continuing
        assert rule is not None and rule.detector.end_marker is not None
        match = rule.detector.end_marker.search(buffer, start, partial=not final)
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
        self, buffer: str, start: int, final: bool
    ) -> tuple[list[_Match], int, RedactionRule | None]:
        end = len(buffer)
        hold_from, hold_rule = end, None
        found: list[tuple[int, int, int, RedactionRule]] = []
        for index, rule in enumerate(self._redactor.rules):
            validate = rule.detector.validate
            # Overlapped: a candidate that fails validation (a 19-digit run
            # failing Luhn) must not hide a valid match starting inside it, or
            # the answer would depend on where a token boundary fell.
            for match in rule.detector.pattern.finditer(
                buffer, start, partial=not final, overlapped=True
            ):
                m_start, m_end = match.span()
                if m_start == end:
                    continue
                # Not final yet: a match that reaches the end, or that more text
                # could still extend ("GB82 WEST 1234" + " 5698 ..."), stays held.
                if match.partial or (
                    not final
                    and rule.detector.pattern.fullmatch(buffer, m_start, end, partial=True)
                ):
                    if m_start < hold_from:
                        hold_from, hold_rule = m_start, rule
                    continue
                if validate is not None and not validate(match.group()):
                    continue
                found.append((m_start, -(m_end - m_start), index, rule))
        found.sort(key=lambda f: (f[0], f[1], f[2]))
        selected: list[_Match] = []
        last_end = start
        for m_start, negative_length, _, rule in found:
            if m_start >= last_end:
                selected.append(_Match(m_start, m_start - negative_length, rule))
                last_end = m_start - negative_length
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
