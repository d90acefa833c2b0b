"""The content checks before `Completed`: `tool_arguments` and `json_schema`.

Each returns one `VerificationCheck` (PASSED or FAILED, its latency set) for
`Verification.checks`. Violations carry RFC 6901 pointers:

- `json_schema`: the pointer is into the response's text as a JSON document
  (`""` is the whole value).
- `tool_arguments`: the pointer is into the JSON array of the calls' parsed
  arguments, in the order of `Completed.tool_calls`: `/0/amount` is the
  `amount` of the first call's arguments, `/1` the whole of the second's.
  The message starts with `tool_calls[i] name (id ...)` for a person.

`INVALID_JSON` carries `start`/`end`: the byte where parsing failed, in the
text (or in that call's `arguments`). At most `MAX_VIOLATIONS` are listed;
a final `MORE_VIOLATIONS` says more were found. A schema whose `$ref` cannot
be resolved (parse_call refuses such a request, so only a caller that skips
it sees this) ends the check as ERROR (`SCHEMA_ERROR`), not as a verdict on
the output.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

import jsonschema_rs
import orjson

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import ResponseFormat, ResponseFormatType, ToolCall, ToolSpec
from tokenwire_server.structured.schemas import CompiledSchemas, Validator, pointer

MAX_VIOLATIONS = 20
TOOL_ARGUMENTS = "tool_arguments"
JSON_SCHEMA = "json_schema"


class _NotJson(Exception):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position  # a byte position


def parse_json(text: str) -> Any:
    """Strict JSON (no NaN or Infinity). orjson first; its refusals (big
    integers, lone surrogates) are rechecked by the standard parser."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise _NotJson(error.msg, len(text[: error.pos].encode())) from None
    except ValueError as error:
        raise _NotJson(str(error), 0) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_json_output(
    text: str, fmt: ResponseFormat, schemas: CompiledSchemas | None = None
) -> pb.VerificationCheck:
    """The response's text against its `response_format` (`schemas`: the
    request's compiled schemas, so a schema is compiled once per request)."""
    started = time.perf_counter()
    violations: list[pb.CheckViolation] = []
    outcome = pb.CHECK_OUTCOME_PASSED
    if fmt.type is not ResponseFormatType.TEXT:
        try:
            value = parse_json(text)
        except _NotJson as error:
            violations.append(_not_json("", "the text is not JSON", error))
        else:
            if fmt.type is ResponseFormatType.JSON_OBJECT or not fmt.schema:
                if not isinstance(value, dict):
                    violations.append(
                        pb.CheckViolation(
                            code="NOT_AN_OBJECT",
                            message=f"the text is a JSON {_kind(value)}, not an object",
                        )
                    )
            else:
                if schemas is None:
                    schemas = CompiledSchemas(response_format=fmt)
                try:
                    validator = schemas.response_validator()
                    assert validator is not None
                    violations += _schema_violations(validator, value, (), "")
                except jsonschema_rs.ValidationError as error:
                    outcome = pb.CHECK_OUTCOME_ERROR
                    violations = [_schema_error(error)]
    return _check(JSON_SCHEMA, violations, started, outcome)


def check_tool_arguments(
    calls: Sequence[ToolCall],
    tools: Sequence[ToolSpec] | CompiledSchemas,
) -> pb.VerificationCheck:
    """Each call's arguments: JSON, an object, valid against its tool's
    `parameters` (a call to a tool the request did not offer fails)."""
    started = time.perf_counter()
    schemas = tools if isinstance(tools, CompiledSchemas) else CompiledSchemas(tools)
    violations: list[pb.CheckViolation] = []
    outcome = pb.CHECK_OUTCOME_PASSED
    for index, call in enumerate(calls):
        who = f"tool_calls[{index}] {call.name} (id {call.id})"
        if schemas.tool(call.name) is None:
            violations.append(
                pb.CheckViolation(
                    code="UNKNOWN_TOOL",
                    message=f"{who}: the request offers no tool of this name",
                    json_pointer=f"/{index}",
                )
            )
            continue
        spec = schemas.tool(call.name)
        if not call.arguments.strip() and spec is not None and not spec.parameters:
            continue  # a function without parameters, called with nothing
        try:
            value = parse_json(call.arguments)
        except _NotJson as error:
            violations.append(_not_json(f"/{index}", f"{who}: arguments are not JSON", error))
            continue
        if not isinstance(value, dict):
            violations.append(
                pb.CheckViolation(
                    code="NOT_AN_OBJECT",
                    message=f"{who}: arguments are a JSON {_kind(value)}, not an object",
                    json_pointer=f"/{index}",
                )
            )
            continue
        try:
            validator = schemas.tool_validator(call.name)
            if validator is not None:
                violations += _schema_violations(validator, value, (index,), f"{who}: ")
        except jsonschema_rs.ValidationError as error:
            outcome = pb.CHECK_OUTCOME_ERROR
            violations.append(_schema_error(error))
        if len(violations) > MAX_VIOLATIONS:
            break
    return _check(TOOL_ARGUMENTS, violations, started, outcome)


def _schema_violations(
    validator: Validator, value: Any, prefix: tuple[int, ...], who: str
) -> list[pb.CheckViolation]:
    if validator.is_valid(value):
        return []
    errors = list(itertools.islice(validator.iter_errors(value), MAX_VIOLATIONS + 1))
    errors.sort(key=lambda e: [str(part) for part in e.instance_path])
    return [
        pb.CheckViolation(
            code="SCHEMA_VIOLATION",
            message=f"{who}{_keyword(error.schema_path)}: {_clip(error.message)}",
            json_pointer=pointer((*prefix, *error.instance_path)),
        )
        for error in errors
    ]


def _keyword(schema_path: Any) -> str:
    return str(schema_path[-1]) if schema_path else "schema"


def _not_json(where: str, what: str, error: _NotJson) -> pb.CheckViolation:
    return pb.CheckViolation(
        code="INVALID_JSON",
        message=f"{what}: {error.message} (byte {error.position})",
        json_pointer=where,
        start=error.position,
        end=error.position + 1,
    )


def _schema_error(error: Exception) -> pb.CheckViolation:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return pb.CheckViolation(
        code="SCHEMA_ERROR", message=f"the schema could not be applied: {_clip(first)}"
    )


def _check(
    name: str,
    violations: list[pb.CheckViolation],
    started: float,
    outcome: pb.CheckOutcome,
) -> pb.VerificationCheck:
    if violations and outcome == pb.CHECK_OUTCOME_PASSED:
        outcome = pb.CHECK_OUTCOME_FAILED
    if len(violations) > MAX_VIOLATIONS:
        violations = violations[:MAX_VIOLATIONS]
        violations.append(
            pb.CheckViolation(code="MORE_VIOLATIONS", message="more violations were not listed")
        )
    check = pb.VerificationCheck(name=name, outcome=outcome, violations=violations)
    check.latency.FromNanoseconds(int((time.perf_counter() - started) * 1e9))
    return check


def early_stop_check(name: str, violation: pb.CheckViolation) -> pb.VerificationCheck:
    """The FAILED check of a response that strict mode stopped (viability.py)."""
    return pb.VerificationCheck(name=name, outcome=pb.CHECK_OUTCOME_FAILED, violations=[violation])


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _clip(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"
