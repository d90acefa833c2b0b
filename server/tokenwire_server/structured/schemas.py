"""A request's JSON Schemas: checked when the request arrives, compiled once.

The schemas come from the caller (`Tool.parameters`, `ResponseFormat.json_schema`)
as `google.protobuf.Struct`, whose numbers are all doubles: `{"maxItems": 3}`
arrives as `3.0`, which some drafts' metaschemas reject as a non-integer, so
integral floats turn back into ints. The draft comes from `$schema`,
2020-12 by default; `format` is an annotation, never asserted (as 2020-12
says), whatever the draft.

Two maintained libraries, each where it is good: `jsonschema` checks a schema
against its metaschema when the request arrives (its SchemaError names the
bad keyword's path, which goes into the BadRequest); `jsonschema_rs` (Rust)
validates answers: a 20 KB payload took 13 ms with `jsonschema` and takes
about 0.05 ms with it, against a budget of 1 ms for the whole check. Both
implement every draft from 4 to 2020-12. References are resolved within the
schema only (`#...`): a remote `$ref` would make a check fetch a URL, so a
request naming one is refused up front, as is a `$ref` that points nowhere
(jsonschema_rs resolves references when it compiles).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jsonschema_rs
from google.protobuf import json_format, struct_pb2
from jsonschema import Draft202012Validator, SchemaError, validators

from tokenwire_server.domain import ResponseFormat, ToolSpec

#: Larger integral doubles are not exact integers anyway.
_MAX_EXACT = 2**53


def struct_to_json(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The Struct as plain JSON values, integral numbers as ints."""
    value = _integral(json_format.MessageToDict(struct))
    assert isinstance(value, dict)
    return value


def _integral(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= _MAX_EXACT else value
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def pointer(parts: Iterable[str | int]) -> str:
    """RFC 6901: `/`-joined, with `~` as `~0` and `/` as `~1` inside a part."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def schema_problem(schema: Mapping[str, Any]) -> str | None:
    """Why `schema` is not a usable JSON Schema (the bad keyword's pointer
    first), or None when it is."""
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(dict(schema))
    except SchemaError as error:
        where = pointer(error.absolute_path) or "/"
        return f"not a valid JSON Schema at {where}: {_clip(error.message)}"
    remote = next(_remote_refs(schema, []), None)
    if remote is not None:
        return (
            f"not a usable JSON Schema at {pointer(remote)}: only references within"
            " the schema ($ref starting with #) are supported"
        )
    try:
        compile_schema(schema)
    except jsonschema_rs.ValidationError as error:
        return f"not a usable JSON Schema: {_clip(str(error).splitlines()[0])}"
    return None


def _remote_refs(value: Any, path: list[str | int]) -> Iterator[list[str | int]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("$ref", "$dynamicRef") and isinstance(item, str):
                if not item.startswith("#"):
                    yield [*path, key]
            else:
                yield from _remote_refs(item, [*path, key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _remote_refs(item, [*path, index])


#: What compile_schema returns (jsonschema_rs has one class per draft).
Validator = Any


def compile_schema(schema: Mapping[str, Any]) -> Validator:
    """A fast validator for a schema (raises jsonschema_rs.ValidationError
    when a reference cannot be resolved)."""
    return jsonschema_rs.validator_for(dict(schema), validate_formats=False)


def _clip(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


class CompiledSchemas:
    """One request's validators, each compiled the first time it is needed and
    reused for every later check of the same response."""

    __slots__ = ("_format", "_response", "_tool_validators", "_tools")

    def __init__(
        self, tools: Sequence[ToolSpec] = (), response_format: ResponseFormat | None = None
    ) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._format = response_format
        self._tool_validators: dict[str, Validator | None] = {}
        self._response: Validator | None = None

    def tool(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def tool_validator(self, name: str) -> Validator | None:
        """None for an unknown tool or one without parameters."""
        if name not in self._tool_validators:
            spec = self._tools.get(name)
            params = spec.parameters if spec is not None else None
            self._tool_validators[name] = compile_schema(params) if params else None
        return self._tool_validators[name]

    def response_validator(self) -> Validator | None:
        if self._response is None and self._format is not None and self._format.schema:
            self._response = compile_schema(self._format.schema)
        return self._response

    @property
    def response_format(self) -> ResponseFormat | None:
        return self._format
