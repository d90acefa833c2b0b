"""What tool calls and structured output add to a response, in process.

One run, one table, every row over the same token stream (4-character
tokens):

1. per token: the governance session over plain text (builtin:default)
   against the JSON governance session over JSON of the same length, and
   strict mode's viability check (with the payload's schema, and without):
   the schema checks' cost per token (issue 23 target: at most 10 us) and,
   reported beside it, what governing JSON costs over governing prose;
2. before Completed: check_json_output and check_tool_arguments on a 20 KB
   JSON payload with its schema compiled once (target: at most 1 ms).

    python bench/structured_checks.py [--repeats 5] [--items 260]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from tokenwire_server.domain import ResponseFormat, ResponseFormatType, ToolCall, ToolSpec
from tokenwire_server.governance.policy import Policy
from tokenwire_server.governance.policy_file import load_policy
from tokenwire_server.structured.checks import check_json_output, check_tool_arguments
from tokenwire_server.structured.json_governance import JsonGovernanceSession
from tokenwire_server.structured.schemas import CompiledSchemas
from tokenwire_server.structured.viability import Viability

PROSE = (
    "The stream of tokens arrives in order and every chunk carries its sequence number. "
    "Operators trace requests across services and correlate logs with metrics. "
)
ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "price": {"type": "number", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": ITEM_SCHEMA}},
    "required": ["items"],
}


def payload(items: int) -> str:
    rows = [
        {"id": i, "name": f"widget {i}", "price": 9.5, "tags": ["a", "b"], "ok": True}
        for i in range(items)
    ]
    return json.dumps({"items": rows})


def tokens(text: str) -> list[str]:
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def per_token_us(make: Callable[[], Any], stream: list[str], repeats: int) -> float:
    """Median over `repeats` of the cost per token of feeding `stream` to a
    fresh object from `make` (push/feed, then finish when it has one)."""
    runs = []
    for _ in range(repeats):
        target = make()
        feed = getattr(target, "push", None) or target.feed
        started = time.perf_counter()
        for token in stream:
            feed(token)
        if hasattr(target, "finish"):
            target.finish()
        runs.append((time.perf_counter() - started) / len(stream) * 1e6)
    return statistics.median(runs)


def once_ms(action: Callable[[], Any], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        runs.append((time.perf_counter() - started) * 1e3)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--items", type=int, default=260, help="rows in the JSON (260: ~20 KB)")
    args = parser.parse_args()

    policy: Policy = load_policy("builtin:default")
    text = payload(args.items)
    json_stream = tokens(text)
    plain_stream = tokens((PROSE * (len(text) // len(PROSE) + 1))[: len(text)])
    n = args.repeats

    plain = per_token_us(policy.open_session, plain_stream, n)
    governed = per_token_us(lambda: JsonGovernanceSession(policy), json_stream, n)
    viable = per_token_us(lambda: Viability(SCHEMA, object_only=True), json_stream, n)
    syntax = per_token_us(lambda: Viability(None, object_only=True), json_stream, n)
    print(f"{len(json_stream)} tokens of 4 characters, {len(text)} bytes; median of {n}\n")
    print(f"{'per token':<58}{'us':>8}")
    print(f"{'governance session, plain text (builtin:default)':<58}{plain:>8.2f}")
    print(f"{'JSON governance session, JSON text (builtin:default)':<58}{governed:>8.2f}")
    print(f"{'viability (strict), JSON with its schema':<58}{viable:>8.2f}")
    print(f"{'viability (strict), JSON object, no schema':<58}{syntax:>8.2f}")
    print(f"{'schema checks added per token (viability with schema)':<58}{viable:>8.2f}")
    print(f"{'  issue 23 target: at most 10 us':<58}{'met' if viable <= 10 else 'MISSED':>8}")
    print(f"{'JSON governance minus plain governance (not a target)':<58}{governed - plain:>8.2f}")

    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema=SCHEMA)
    schemas = CompiledSchemas(response_format=fmt)
    tool = ToolSpec("put_items", parameters=SCHEMA)
    tool_schemas = CompiledSchemas([tool])
    calls = [ToolCall("call_1", "put_items", text)]
    check_json_output(text, fmt, schemas)
    check_tool_arguments(calls, tool_schemas)
    output_ms = once_ms(lambda: check_json_output(text, fmt, schemas), n * 4)
    tools_ms = once_ms(lambda: check_tool_arguments(calls, tool_schemas), n * 4)
    compile_ms = once_ms(lambda: CompiledSchemas(response_format=fmt).response_validator(), n)
    print(f"\n{'before Completed, ' + str(len(text)) + '-byte payload':<58}{'ms':>8}")
    print(f"{'check_json_output (json_schema)':<58}{output_ms:>8.3f}")
    print(f"{'check_tool_arguments (tool_arguments), one call':<58}{tools_ms:>8.3f}")
    print(f"{'compiling the schema (once per request)':<58}{compile_ms:>8.3f}")
    worst = max(output_ms, tools_ms)
    print(f"{'  issue 23 target: at most 1 ms':<58}{'met' if worst <= 1 else 'MISSED':>8}")


if __name__ == "__main__":
    main()
