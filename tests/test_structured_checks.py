"""The `tool_arguments` and `json_schema` checks: outcomes, codes, RFC 6901
pointers (prefixed with the call's index for tool calls), byte positions of
JSON errors, the violation cap, and the cost of a 20 KB payload."""

from __future__ import annotations

import json
import time
from typing import Any

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import ResponseFormat, ResponseFormatType, ToolCall, ToolSpec
from tokenwire_server.structured.checks import (
    MAX_VIOLATIONS,
    check_json_output,
    check_tool_arguments,
)
from tokenwire_server.structured.schemas import CompiledSchemas, pointer, schema_problem

TRANSFER = ToolSpec(
    "transfer_funds",
    parameters={
        "type": "object",
        "properties": {
            "amount": {"type": "integer", "minimum": 1},
            "to/iban": {"type": "string"},
            "memo~": {"type": "string", "maxLength": 5},
        },
        "required": ["amount"],
        "additionalProperties": False,
    },
)
NOOP = ToolSpec("noop")


def codes(check: pb.VerificationCheck) -> list[tuple[str, str]]:
    return [(v.code, v.json_pointer) for v in check.violations]


def test_valid_calls_pass_with_latency() -> None:
    check = check_tool_arguments(
        [ToolCall("c1", "transfer_funds", '{"amount": 5}'), ToolCall("c2", "noop", "")],
        [TRANSFER, NOOP],
    )
    assert check.name == "tool_arguments"
    assert check.outcome == pb.CHECK_OUTCOME_PASSED, check
    assert check.HasField("latency") and not check.violations


def test_schema_violations_point_into_each_calls_arguments() -> None:
    calls = [
        ToolCall("c1", "transfer_funds", '{"amount": 5}'),
        ToolCall("c2", "transfer_funds", '{"amount": 0, "to/iban": 3, "memo~": "toolong"}'),
    ]
    check = check_tool_arguments(calls, [TRANSFER])
    assert check.outcome == pb.CHECK_OUTCOME_FAILED
    assert codes(check) == [
        ("SCHEMA_VIOLATION", "/1/amount"),
        ("SCHEMA_VIOLATION", "/1/memo~0"),
        ("SCHEMA_VIOLATION", "/1/to~1iban"),
    ]
    assert all(
        v.message.startswith("tool_calls[1] transfer_funds (id c2)") for v in check.violations
    )


def test_bad_json_unknown_tool_and_non_objects() -> None:
    calls = [
        ToolCall("c1", "transfer_funds", '{"amount": 1,'),
        ToolCall("c2", "wire_money", "{}"),
        ToolCall("c3", "transfer_funds", "[1]"),
        ToolCall("c4", "transfer_funds", '{"amount": NaN}'),
    ]
    check = check_tool_arguments(calls, [TRANSFER])
    assert codes(check) == [
        ("INVALID_JSON", "/0"),
        ("UNKNOWN_TOOL", "/1"),
        ("NOT_AN_OBJECT", "/2"),
        ("INVALID_JSON", "/3"),
    ]
    bad = check.violations[0]
    assert (bad.start, bad.end) == (13, 14)


def test_missing_required_is_reported_at_the_object() -> None:
    check = check_tool_arguments([ToolCall("c", "transfer_funds", "{}")], [TRANSFER])
    assert codes(check) == [("SCHEMA_VIOLATION", "/0")]
    assert "required" in check.violations[0].message


def test_json_output_formats() -> None:
    obj = ResponseFormat(ResponseFormatType.JSON_OBJECT)
    assert check_json_output('{"a": [1]}', obj).outcome == pb.CHECK_OUTCOME_PASSED
    assert codes(check_json_output("[1]", obj)) == [("NOT_AN_OBJECT", "")]
    broken = check_json_output('{"é": tru', obj)
    assert broken.name == "json_schema" and codes(broken) == [("INVALID_JSON", "")]
    assert broken.violations[0].start == 7  # bytes: é is two
    schema = ResponseFormat(
        ResponseFormatType.JSON_SCHEMA,
        schema={
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"tags": {"type": "array", "items": [{"type": "string"}]}},
        },
    )
    # Draft 7's tuple `items` is honoured because of $schema.
    assert codes(check_json_output('{"tags": [1]}', schema)) == [("SCHEMA_VIOLATION", "/tags/0")]
    # A very large integer is still JSON (orjson refuses it; the stdlib parser decides).
    assert check_json_output('{"n": 123456789012345678901234567890}', obj).outcome == 1


def test_violations_are_capped() -> None:
    fmt = ResponseFormat(
        ResponseFormatType.JSON_SCHEMA, schema={"type": "array", "items": {"type": "string"}}
    )
    check = check_json_output(json.dumps(list(range(100))), fmt)
    assert len(check.violations) == MAX_VIOLATIONS + 1
    assert check.violations[-1].code == "MORE_VIOLATIONS"


def test_schema_problems_name_the_pointer() -> None:
    assert schema_problem({"type": "object"}) is None
    problem = schema_problem({"properties": {"a/b": {"type": 1}}})
    assert problem is not None and "/properties/a~1b/type" in problem
    assert pointer(["a~b", 0, "c/d"]) == "/a~0b/0/c~1d"


def payload_20kb() -> tuple[str, dict[str, Any]]:
    item = {"id": 1, "name": "widget", "price": 9.5, "tags": ["a", "b"], "ok": True}
    items = [dict(item, id=i) for i in range(260)]
    text = json.dumps({"items": items})
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "price": {"type": "number"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "ok": {"type": "boolean"},
                    },
                    "required": ["id", "name"],
                },
            }
        },
        "required": ["items"],
    }
    return text, schema


def test_a_20kb_payload_is_checked_quickly() -> None:
    text, schema = payload_20kb()
    assert 19_000 <= len(text) <= 22_000
    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema=schema)
    schemas = CompiledSchemas(response_format=fmt)
    check_json_output(text, fmt, schemas)  # compiles once
    best = min(_timed(lambda: check_json_output(text, fmt, schemas)) for _ in range(5))
    assert check_json_output(text, fmt, schemas).outcome == pb.CHECK_OUTCOME_PASSED
    # The target is 1 ms; a loaded 2-core machine gets slack, the bench records the figure.
    assert best < 0.02, best


def _timed(action: Any) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started
