"""Strict mode's viability: valid output is never stopped, however it is cut
into tokens; output that can no longer become valid is stopped where that
becomes certain, with a pointer; `required`, `min*` and values under way
never trigger before their container closes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.test_structured_checks import payload_20kb
from tokenwire_server.domain import ResponseFormat, ResponseFormatType, ToolSpec
from tokenwire_server.structured.viability import Viability

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}},
        "n": {"$ref": "#/$defs/positive"},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
    },
    "required": ["name"],
    "additionalProperties": False,
    "$defs": {"positive": {"type": "integer", "minimum": 1}},
}


def first(text: str, schema: Any = SCHEMA, object_only: bool = False, step: int = 1) -> Any:
    """(character index, code, pointer) of the first violation, or None."""
    viability = Viability(schema, object_only=object_only)
    for i in range(0, len(text), step):
        violation = viability.feed(text[i : i + step])
        if violation is not None:
            return i, violation.code, violation.json_pointer
    return None


VALID = [
    '{"name": "bob", "tags": ["a"], "n": 3, "maybe": null, "pair": ["x"]}',
    '  {"name": "b\\u00e9\\"", "tags": []}  \n',
    '{"name": "a", "maybe": "x"}',
]


@pytest.mark.parametrize("text", VALID)
def test_valid_output_is_never_stopped_at_any_cut(text: str) -> None:
    for step in (1, 2, 3, 5, len(text)):
        assert first(text, step=step) is None


def test_prefixes_of_valid_output_stay_viable() -> None:
    # required and minimum-style keywords wait for the object to close
    for text in ['{"tags": ["a"]', '{"n": 1', '{"name": "ab', "{", "  "]:
        assert first(text) is None, text


BAD = [
    ('  {"name": "bobby!"', "SCHEMA_VIOLATION", "/name"),  # maxLength, once the string closes
    ('{"x": 1', "SCHEMA_VIOLATION", "/x"),  # additionalProperties: false, at the key
    ('{"tags": ["a","b","a"]', "SCHEMA_VIOLATION", "/tags/2"),  # maxItems
    ('{"tags": ["c"', "SCHEMA_VIOLATION", "/tags/0"),  # enum
    ('{"n": 0,', "SCHEMA_VIOLATION", "/n"),  # minimum through a $ref
    ('{"n": "3"', "SCHEMA_VIOLATION", "/n"),  # type, at the opening quote
    ('{"maybe": 5,', "SCHEMA_VIOLATION", "/maybe"),  # anyOf on a completed scalar
    ('{"pair": ["x", "y"', "SCHEMA_VIOLATION", "/pair/1"),  # items: false after prefixItems
    ('{"tags": [] }', "SCHEMA_VIOLATION", ""),  # required, once the object closes
    ("Here is the JSON", "INVALID_JSON", ""),
    ('{"name": "a"} and more', "INVALID_JSON", ""),
    ('{"name": "a\\x"', "INVALID_JSON", "/name"),
    ('{"name" "a"}', "INVALID_JSON", "/name"),
    ('{"n": 01}', "INVALID_JSON", "/n"),
    ('{"maybe": nul}', "INVALID_JSON", "/maybe"),
]


@pytest.mark.parametrize(("text", "code", "where"), BAD)
def test_output_that_cannot_become_valid_is_stopped(text: str, code: str, where: str) -> None:
    for step in (1, 3, len(text)):
        result = first(text, step=step)
        assert result is not None and result[1:] == (code, where), (step, result)


def test_json_object_format_and_tool_arguments_must_be_objects() -> None:
    obj = Viability.for_format(ResponseFormat(ResponseFormatType.JSON_OBJECT))
    violation = obj.feed('["a"]')
    assert violation is not None and violation.code == "INVALID_JSON"
    tool = Viability.for_tool(ToolSpec("noop"))
    assert tool.feed(' {"any": [1, {"x": null}]}') is None
    # The violation is reported once and stays.
    assert obj.feed("more") is violation


def test_byte_positions_count_utf8() -> None:
    viability = Viability(None, object_only=True)
    assert viability.feed('{"é": 1') is None
    violation = viability.feed(" x")
    assert violation is not None and violation.start == len('{"é": 1 '.encode())


def test_draft_7_tuple_items_and_ref_siblings() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "array",
        "items": [{"type": "string"}],
        "additionalItems": False,
    }
    assert first('["a", 1', schema)[1:] == ("SCHEMA_VIOLATION", "/1")
    assert first('["a"]', schema) is None


def test_the_cost_per_token_is_within_budget() -> None:
    text, schema = payload_20kb()
    tokens = [text[i : i + 4] for i in range(0, len(text), 4)]
    best = float("inf")
    for _ in range(3):
        viability = Viability(schema, object_only=True)
        started = time.perf_counter()
        for token in tokens:
            assert viability.feed(token) is None
        best = min(best, (time.perf_counter() - started) / len(tokens))
    json.loads(text)
    # The budget is 10 us per token; a loaded 2-core machine gets twice that here.
    assert best < 20e-6, best
