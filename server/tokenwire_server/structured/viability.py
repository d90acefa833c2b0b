"""Strict mode: can this output still become valid? Answered as it streams.

`Viability.feed(text)` returns None while the text so far is still the start
of some valid answer, and the first violation once it cannot be, so the
response can stop (FINISH_REASON_INVALID_OUTPUT) instead of paying for the
rest of its tokens. Two layers, both sound (never a false alarm):

- syntax: the text must stay a prefix of one JSON value (leading and
  trailing whitespace allowed; an object for JSON_OBJECT and tool arguments);
- schema: checked when something is known for good, at structural
  boundaries, never per character: a value's type when it starts, a
  property `additionalProperties: false` does not allow, an item past
  `maxItems` or past a closed tuple, a completed scalar against its schema
  (enum, const, pattern, bounds, anyOf ... validated by jsonschema_rs), and,
  once a container closes, `required`, `minProperties` and `minItems`.
  A value still under way never triggers anything.

Which subschema applies where: `properties`, `patternProperties`,
`additionalProperties`, `prefixItems`, `items` (tuple form before 2020-12),
and, conjunctively, `allOf` members and `$ref`s within the document. Under
`anyOf`, `oneOf`, `if` and the like the position's schema is unknown: the
output stays viable there (the final check decides), rather than guess.

Cost: strings are skipped with a regex search, structure is a few dict
lookups per character; bench/structured_checks.py measures it per token.

Why one module: the lexer's states and the schema positions it keeps are one
stack; split, every transition would cross a module boundary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema_rs

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import ResponseFormat, ResponseFormatType, ToolSpec, utf8_length
from tokenwire_server.structured.schemas import pointer

_STRING_END = re.compile(r'["\\]')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_SPACE = frozenset(" \t\r\n")
_LITERALS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}
_OLD_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07")
#: Keywords handled by descending (or meaningless for a scalar): left out of
#: the schema a completed scalar is validated against.
_DESCENT = frozenset(
    {"$ref", "allOf", "properties", "patternProperties", "additionalProperties", "items"}
    | {"prefixItems", "additionalItems", "required", "minProperties", "maxProperties"}
    | {"minItems", "maxItems", "$defs", "definitions", "unevaluatedProperties"}
    | {"unevaluatedItems", "contains", "propertyNames"}
)
_KINDS = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean"}
_KINDS["n"] = "null"


class _Frame:
    __slots__ = ("count", "is_object", "key", "keys", "schemas", "state")

    def __init__(self, is_object: bool, schemas: list[Mapping[str, Any]]) -> None:
        self.is_object = is_object
        self.schemas = schemas
        self.count = 0  # members or items begun
        self.key: str | int = ""  # the member or item under way (for pointers)
        self.keys: set[str] = set()
        # object: key? key , : value after ; array: value? value after
        self.state = "first"


class Viability:
    """One output's strict check (a response's text, or one tool call's arguments)."""

    def __init__(self, schema: Mapping[str, Any] | None, *, object_only: bool) -> None:
        self._root = schema if isinstance(schema, Mapping) else None
        draft = str(self._root.get("$schema", "")) if self._root else ""
        self._old = any(name in draft for name in _OLD_DRAFTS)
        self._object_only = object_only
        self._stack: list[_Frame] = []
        self._done = False
        self._bytes = 0
        self._scalar = ""  # "s" string, "n" number, "l" literal, "" none
        self._buffer: list[str] = []
        self._escape = False
        self._is_key = False
        self._scalar_schemas: list[Mapping[str, Any]] = []
        self._validators: dict[int, Any] = {}
        self._keep: list[Mapping[str, Any]] = []  # keeps id()s of cached schemas valid
        self._top = self._expand(self._root) if self._root is not None else []
        self.violation: pb.CheckViolation | None = None

    @classmethod
    def for_format(cls, fmt: ResponseFormat) -> Viability:
        return cls(fmt.schema, object_only=fmt.type is ResponseFormatType.JSON_OBJECT)

    @classmethod
    def for_tool(cls, spec: ToolSpec) -> Viability:
        return cls(spec.parameters, object_only=True)

    def feed(self, text: str) -> pb.CheckViolation | None:
        if self.violation is None:
            self.violation = self._scan(text)
            self._bytes += utf8_length(text)
        return self.violation

    # -- syntax -------------------------------------------------------------------------

    def _scan(self, text: str) -> pb.CheckViolation | None:
        i, n = 0, len(text)
        while i < n:
            if self._scalar == "s":
                if self._escape:
                    self._escape = False
                    self._buffer.append(text[i])
                    i += 1
                    continue
                match = _STRING_END.search(text, i)
                end = n if match is None else match.start()
                self._buffer.append(text[i:end])
                if match is None:
                    return None
                self._buffer.append(text[end])
                i = end + 1
                if text[end] == "\\":
                    self._escape = True
                    continue
                problem = self._end_string(text, end)
                if problem is not None:
                    return problem
                continue
            char = text[i]
            if self._scalar == "n":
                if char in _NUMBER_CHARS:
                    self._buffer.append(char)
                    i += 1
                    continue
                problem = self._end_number(text, i)
                if problem is not None:
                    return problem
            elif self._scalar == "l":
                self._buffer.append(char)
                word = "".join(self._buffer)
                literal, value = _LITERALS[word[0]]
                if not literal.startswith(word):
                    return self._syntax(text, i, f"expected {literal}")
                if word == literal:
                    self._scalar = ""
                    problem = self._scalar_done(value, text, i)
                    if problem is not None:
                        return problem
                i += 1
                continue
            problem = self._structure(char, text, i)
            if problem is not None:
                return problem
            i += 1
        return None

    def _structure(self, char: str, text: str, i: int) -> pb.CheckViolation | None:
        if char in _SPACE:
            return None
        if self._done:
            return self._syntax(text, i, "text after the JSON value")
        if not self._stack:
            if self._object_only and char != "{":
                return self._syntax(text, i, "expected a JSON object")
            return self._value(char, self._top, text, i)
        frame = self._stack[-1]
        state = frame.state
        if frame.is_object:
            if state in ("first", "key") and char == '"':
                self._scalar, self._buffer, self._is_key = "s", [], True
                return None
            if state == ":" and char == ":":
                frame.state = "value"
                return None
            if state == "value":
                frame.state = "after"
                return self._value(char, self._child_of_member(frame, text, i), text, i)
            if state == "after" and char == ",":
                frame.state = "key"
                return None
            if char == "}" and state in ("first", "after"):
                return self._close(frame, text, i)
            return self._syntax(text, i, "unexpected character in an object")
        if char == "]" and state in ("first", "after"):
            return self._close(frame, text, i)
        if state == "after":
            if char == ",":
                frame.state = "value"
                return None
            return self._syntax(text, i, "expected , or ] in an array")
        frame.state = "after"
        return self._item(frame, char, text, i)

    def _value(
        self, char: str, schemas: list[Mapping[str, Any]], text: str, i: int
    ) -> pb.CheckViolation | None:
        kind = _KINDS.get(char) or ("number" if char in "-0123456789" else "")
        if not kind:
            return self._syntax(text, i, "expected a JSON value")
        problem = self._type_problem(kind, schemas)
        if problem is not None:
            return self._schema(problem, text, i)
        if char == "{" or char == "[":
            self._stack.append(_Frame(char == "{", schemas))
        elif char == '"':
            self._scalar, self._buffer, self._is_key = "s", [], False
            self._scalar_schemas = schemas
        else:
            self._scalar, self._buffer = ("n" if kind == "number" else "l"), [char]
            self._scalar_schemas = schemas
        return None

    def _end_string(self, text: str, end: int) -> pb.CheckViolation | None:
        self._scalar = ""
        raw = '"' + "".join(self._buffer)
        try:
            value = json.loads(raw)
        except ValueError:
            return self._syntax(
                text, end, "not a valid JSON string (an escape or a control character)"
            )
        if self._is_key:
            frame = self._stack[-1]
            frame.state, frame.key = ":", value
            frame.keys.add(value)
            frame.count += 1
            return self._member_allowed(frame, value, text, end)
        return self._scalar_done(value, text, end)

    def _end_number(self, text: str, i: int) -> pb.CheckViolation | None:
        self._scalar = ""
        token = "".join(self._buffer)
        if _NUMBER.fullmatch(token) is None:
            return self._syntax(text, i, f"{token!r} is not a JSON number")
        value = json.loads(token)
        return self._scalar_done(value, text, i)

    def _close(self, frame: _Frame, text: str, i: int) -> pb.CheckViolation | None:
        problem = self._closed_problem(frame)
        if problem is not None:
            return self._schema(problem, text, i, pointer(f.key for f in self._stack[:-1]))
        self._stack.pop()
        if not self._stack:
            self._done = True
        return None

    def _syntax(self, text: str, i: int, message: str) -> pb.CheckViolation:
        start = self._bytes + utf8_length(text[:i])
        return pb.CheckViolation(
            code="INVALID_JSON",
            message=f"the output can no longer be valid JSON: {message} (byte {start})",
            json_pointer=self._pointer(),
            start=start,
            end=start + 1,
        )

    def _schema(
        self, message: str, text: str, i: int, where: str | None = None
    ) -> pb.CheckViolation:
        start = self._bytes + utf8_length(text[:i])
        return pb.CheckViolation(
            code="SCHEMA_VIOLATION",
            message=f"the output can no longer match the schema: {message}",
            json_pointer=self._pointer() if where is None else where,
            start=start,
            end=start + 1,
        )

    def _pointer(self) -> str:
        return pointer(f.key for f in self._stack if f.count)

    # -- schema ---------------------------------------------------------------------------

    def _expand(self, schema: Any, depth: int = 0) -> list[Mapping[str, Any]]:
        """The schemas that apply at one position: itself, its allOf members
        and $ref targets (conjunctive); `False` stays, as the empty schema."""
        if schema is False:
            return [{"not": {}}]
        if not isinstance(schema, Mapping) or depth > 16:
            return []
        found: list[Mapping[str, Any]] = []
        ref = schema.get("$ref")
        target = self._resolve(ref) if isinstance(ref, str) else None
        if target is not None:
            found += self._expand(target, depth + 1)
            if self._old:  # before 2019-09, $ref's siblings are ignored
                return found
        found.append(schema)
        for member in schema.get("allOf", ()):
            found += self._expand(member, depth + 1)
        return found

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#/") and ref != "#":
            return None
        node: Any = self._root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def _type_problem(self, kind: str, schemas: list[Mapping[str, Any]]) -> str | None:
        for schema in schemas:
            if "not" in schema and schema["not"] == {}:
                return "no value is allowed here"
            types = schema.get("type")
            if types is not None:
                allowed = [types] if isinstance(types, str) else list(types)
                if kind not in allowed and not (kind == "number" and "integer" in allowed):
                    return f"{_an(kind)} where the schema wants {' or '.join(allowed)}"
            if kind in ("object", "array"):
                options = schema.get("enum", [schema["const"]] if "const" in schema else None)
                want = dict if kind == "object" else list
                if options is not None and not any(isinstance(o, want) for o in options):
                    return f"{_an(kind)} where the schema allows only {options!r:.80}"
        return None

    def _child_of_member(self, frame: _Frame, text: str, i: int) -> list[Mapping[str, Any]]:
        key = str(frame.key)
        found: list[Mapping[str, Any]] = []
        for schema in frame.schemas:
            properties = schema.get("properties") or {}
            if key in properties:
                found += self._expand(properties[key])
                continue
            matched = False
            for pattern, sub in (schema.get("patternProperties") or {}).items():
                try:
                    hit = re.search(pattern, key) is not None
                except re.error:
                    hit = True
                if hit:
                    matched = True
                    found += self._expand(sub)
            extra = schema.get("additionalProperties")
            if not matched and isinstance(extra, Mapping):
                found += self._expand(extra)
        return found

    def _member_allowed(
        self, frame: _Frame, key: str, text: str, i: int
    ) -> pb.CheckViolation | None:
        for schema in frame.schemas:
            limit = schema.get("maxProperties")
            if isinstance(limit, int) and frame.count > limit:
                return self._schema(f"more than maxProperties {limit} members", text, i)
            if schema.get("additionalProperties") is False and key not in (
                schema.get("properties") or {}
            ):
                patterns = schema.get("patternProperties") or {}
                if not any(_searches(p, key) for p in patterns):
                    return self._schema(f"property {key!r} is not allowed", text, i)
        return None

    def _item(self, frame: _Frame, char: str, text: str, i: int) -> pb.CheckViolation | None:
        index = frame.count
        frame.count += 1
        frame.key = index
        found: list[Mapping[str, Any]] = []
        for schema in frame.schemas:
            limit = schema.get("maxItems")
            if isinstance(limit, int) and index >= limit:
                return self._schema(f"more than maxItems {limit} items", text, i)
            prefix = schema.get("items" if self._old else "prefixItems")
            rest = schema.get("additionalItems" if self._old else "items")
            if self._old and not isinstance(prefix, list):
                prefix, rest = None, prefix
            if isinstance(prefix, list) and index < len(prefix):
                found += self._expand(prefix[index])
            elif rest is False and isinstance(prefix, list):
                return self._schema(f"more than the {len(prefix)} items allowed", text, i)
            elif isinstance(rest, Mapping | bool):
                found += self._expand(rest)
        return self._value(char, found, text, i)

    def _closed_problem(self, frame: _Frame) -> str | None:
        for schema in frame.schemas:
            if frame.is_object:
                missing = [k for k in schema.get("required", ()) if k not in frame.keys]
                if missing:
                    return f"the object closed without required {', '.join(map(repr, missing))}"
                low = schema.get("minProperties")
            else:
                low = schema.get("minItems")
            if isinstance(low, int) and frame.count < low:
                return f"closed with {frame.count} of at least {low}"
        return None

    def _scalar_done(self, value: Any, text: str, i: int) -> pb.CheckViolation | None:
        if not self._stack:
            self._done = True
        for schema in self._scalar_schemas:
            validator = self._validator(schema)
            if validator is not None and not validator.is_valid(value):
                error = next(iter(validator.iter_errors(value)), None)
                return self._schema(str(error.message if error else "invalid"), text, i)
        return None

    def _validator(self, schema: Mapping[str, Any]) -> Any:
        key = id(schema)
        if key not in self._validators:
            local = {k: v for k, v in schema.items() if k not in _DESCENT}
            if self._root is not None:
                for name in ("$schema", "$defs", "definitions", "$id"):
                    if name in self._root:
                        local.setdefault(name, self._root[name])
            try:
                self._validators[key] = jsonschema_rs.validator_for(local, validate_formats=False)
            except Exception:  # an exotic reference: stay viable rather than guess
                self._validators[key] = None
            self._keep.append(schema)
        return self._validators[key]


def _searches(pattern: str, key: str) -> bool:
    try:
        return re.search(pattern, key) is not None
    except re.error:
        return True


def _an(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
