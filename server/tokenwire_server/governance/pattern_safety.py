"""Refuses policy patterns whose shape is known to backtrack catastrophically.

A quantifier without an upper bound applied to a group that itself contains
one (`(a+)+`, `(\\w+\\s?)*`, `(?:x*y?)+`) can try exponentially many ways to
split its input before it fails. Such a pattern is refused when the policy
loads, with the position of the outer quantifier, so the operator fixes it
before it serves. Patterns that only turn slow on particular text (`(a|aa)+$`)
are not found here; the per-call time budget in the redaction stage stops
those. Atomic groups and possessive quantifiers never backtrack and pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Group:
    atomic: bool
    #: Position of an unbounded quantifier inside, if any.
    unbounded_at: int | None = None


def nested_unbounded_quantifier(pattern: str) -> tuple[int, int] | None:
    """(outer, inner) positions of an unbounded quantifier over a group that
    holds one; None when there is none."""
    stack = [_Group(atomic=False)]
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        atom_group: _Group | None = None
        if char == "\\":
            i = _skip_escape(pattern, i)
        elif char == "[":
            i = _skip_class(pattern, i)
        elif char == "(":
            if pattern.startswith("(?#", i):
                end = pattern.find(")", i)
                i = n if end < 0 else end + 1
                continue
            stack.append(_Group(atomic=pattern.startswith("(?>", i)))
            i += 1
            continue
        elif char == ")":
            group = stack.pop() if len(stack) > 1 else _Group(atomic=False)
            atom_group = group
            i += 1
        else:
            i += 1
        # A quantifier may follow the atom that ends at i.
        quantifier = _quantifier(pattern, i)
        if quantifier is not None:
            q_end, unbounded, possessive = quantifier
            if (
                unbounded
                and not possessive
                and atom_group is not None
                and not atom_group.atomic
                and atom_group.unbounded_at is not None
            ):
                return i, atom_group.unbounded_at
            if unbounded and not possessive and stack[-1].unbounded_at is None:
                stack[-1].unbounded_at = i
            i = q_end
        if (
            atom_group is not None
            and not atom_group.atomic
            and atom_group.unbounded_at is not None
            and stack[-1].unbounded_at is None
        ):
            stack[-1].unbounded_at = atom_group.unbounded_at
    return None


def _skip_escape(pattern: str, i: int) -> int:
    if i + 1 >= len(pattern):
        return i + 1
    if pattern[i + 1] in "pPNxuUgk" and i + 2 < len(pattern) and pattern[i + 2] in "{<":
        close = "}" if pattern[i + 2] == "{" else ">"
        end = pattern.find(close, i + 2)
        return len(pattern) if end < 0 else end + 1
    return i + 2


def _skip_class(pattern: str, i: int) -> int:
    depth, i = 1, i + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1  # a leading ] is a literal
    while i < len(pattern) and depth:
        char = pattern[i]
        if char == "\\":
            i = _skip_escape(pattern, i)
            continue
        if char == "[" and not pattern.startswith("[:", i):
            depth += 1
        elif char == "[":
            end = pattern.find(":]", i + 2)
            i = len(pattern) if end < 0 else end + 2
            continue
        elif char == "]":
            depth -= 1
        i += 1
    return i


def _quantifier(pattern: str, i: int) -> tuple[int, bool, bool] | None:
    """(end, unbounded, possessive) of a quantifier starting at i."""
    if i >= len(pattern):
        return None
    char = pattern[i]
    if char in "*+?":
        end, unbounded = i + 1, char != "?"
    elif char == "{":
        close = pattern.find("}", i)
        if close < 0:
            return None
        body = pattern[i + 1 : close]
        low, comma, high = body.partition(",")
        if not (low.strip().isdigit() or low.strip() == "") or not (
            high.strip().isdigit() or high.strip() == ""
        ):
            return None  # a literal brace
        if not comma and not low.strip():
            return None
        end, unbounded = close + 1, bool(comma) and not high.strip()
    else:
        return None
    possessive = end < len(pattern) and pattern[end] == "+"
    if end < len(pattern) and pattern[end] in "+?":
        end += 1
    return end, unbounded, possessive
