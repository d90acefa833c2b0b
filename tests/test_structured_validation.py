"""Tools, tool choice, response format and tool turns are checked at the door:
a bad request is INVALID_ARGUMENT with a BadRequest naming every offending
field (a schema problem names the bad keyword's JSON pointer), through a real
server; a good one reaches generation with integers kept as integers."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.conftest import RunningServer, respond_request, status_details, stream_request, user
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.structured.request_fields import MAX_TOOLS
from tokenwire_server.validation import ParsedCall, parse_call


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7}},
    "required": ["city"],
    "additionalProperties": False,
}


def tool(name: str = "get_weather", parameters: dict[str, Any] | None = None) -> pb.Tool:
    t = pb.Tool(name=name, description="d")
    if parameters is not None:
        t.parameters.CopyFrom(struct(parameters))
    return t


def assistant_call(call_id: str = "call_1", name: str = "get_weather") -> pb.ChatMessage:
    return pb.ChatMessage(
        role=pb.ROLE_ASSISTANT,
        tool_calls=[pb.ToolCall(id=call_id, name=name, arguments='{"city": "Oslo"}')],
    )


def tool_answer(call_id: str = "call_1", content: str = "sunny") -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id=call_id, content=content)


BAD = [
    pytest.param(
        {"tools": [tool("")]}, "tools[0].name", "INVALID_TOOL_NAME", "empty", id="name-empty"
    ),
    pytest.param(
        {"tools": [tool("get weather")]},
        "tools[0].name",
        "INVALID_TOOL_NAME",
        "a-z",
        id="name-chars",
    ),
    pytest.param(
        {"tools": [tool("x" * 65)]}, "tools[0].name", "INVALID_TOOL_NAME", "at most 64", id="long"
    ),
    pytest.param(
        {"tools": [tool("a"), tool("a")]}, "tools[1].name", "DUPLICATE_TOOL_NAME", "twice", id="dup"
    ),
    pytest.param(
        {"tools": [tool(f"t{i}") for i in range(MAX_TOOLS + 1)]},
        "tools",
        "TOO_MANY_TOOLS",
        "at most 128",
        id="too-many",
    ),
    pytest.param(
        {"tools": [tool("a", {"type": "object", "properties": {"n": {"type": "strin"}}})]},
        "tools[0].parameters",
        "INVALID_TOOL_SCHEMA",
        "/properties/n/type",
        id="bad-schema",
    ),
    pytest.param(
        {"tools": [tool("a", {"type": "object", "properties": {"n": {"maxLength": -1}}})]},
        "tools[0].parameters",
        "INVALID_TOOL_SCHEMA",
        "/properties/n/maxLength",
        id="bad-schema-number",
    ),
    pytest.param(
        {"tools": [tool("a", {"properties": {"n": {"$ref": "https://example.com/s.json"}}})]},
        "tools[0].parameters",
        "INVALID_TOOL_SCHEMA",
        "/properties/n/$ref",
        id="remote-ref",
    ),
    pytest.param(
        {"tools": [tool("a")], "tool_choice": pb.ToolChoice(function_name="b")},
        "tool_choice.function_name",
        "UNKNOWN_TOOL_CHOICE",
        "'b' is not one of",
        id="choice-unknown",
    ),
    pytest.param(
        {"tool_choice": pb.ToolChoice(function_name="b")},
        "tool_choice.function_name",
        "TOOL_CHOICE_NO_TOOLS",
        "needs the request's tools",
        id="choice-fn-no-tools",
    ),
    pytest.param(
        {"tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)},
        "tool_choice.mode",
        "TOOL_CHOICE_NO_TOOLS",
        "REQUIRED",
        id="required-no-tools",
    ),
    pytest.param(
        {"tool_choice": pb.ToolChoice(mode=42)},  # type: ignore[arg-type]
        "tool_choice.mode",
        "INVALID_TOOL_CHOICE",
        "AUTO, NONE or REQUIRED",
        id="choice-mode-unknown",
    ),
    pytest.param(
        {"response_format": pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)},
        "response_format.json_schema",
        "INVALID_RESPONSE_FORMAT",
        "required",
        id="schema-missing",
    ),
    pytest.param(
        {
            "response_format": pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                json_schema=struct({"type": "object", "required": "city"}),
            )
        },
        "response_format.json_schema",
        "INVALID_RESPONSE_SCHEMA",
        "/required",
        id="schema-invalid",
    ),
    pytest.param(
        {"response_format": pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT, schema_name="x")},
        "response_format.schema_name",
        "INVALID_RESPONSE_FORMAT",
        "only with",
        id="text-with-name",
    ),
    pytest.param(
        {
            "response_format": pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_TEXT, json_schema=struct({"type": "object"})
            )
        },
        "response_format.json_schema",
        "INVALID_RESPONSE_FORMAT",
        "only with",
        id="text-with-schema",
    ),
    pytest.param(
        {"response_format": pb.ResponseFormat(type=9)},  # type: ignore[arg-type]
        "response_format.type",
        "INVALID_RESPONSE_FORMAT",
        "TEXT, JSON_OBJECT or JSON_SCHEMA",
        id="format-unknown",
    ),
    pytest.param(
        {"messages": [user("hi"), pb.ChatMessage(role=pb.ROLE_TOOL, content="x")]},
        "messages[1].tool_call_id",
        "MISSING_TOOL_CALL_ID",
        "required with ROLE_TOOL",
        id="tool-without-id",
    ),
    pytest.param(
        {"messages": [user("hi"), tool_answer("call_9")]},
        "messages[1].tool_call_id",
        "UNKNOWN_TOOL_CALL_ID",
        "names no tool call",
        id="tool-unmatched",
    ),
    pytest.param(
        {"messages": [user("hi"), tool_answer("call_1"), assistant_call("call_1")]},
        "messages[1].tool_call_id",
        "UNKNOWN_TOOL_CALL_ID",
        "earlier",
        id="tool-answer-before-call",
    ),
    pytest.param(
        {"messages": [pb.ChatMessage(role=pb.ROLE_USER, content="hi", tool_call_id="c")]},
        "messages[0].tool_call_id",
        "MISPLACED_TOOL_CALL_ID",
        "only in ROLE_TOOL",
        id="id-on-user",
    ),
    pytest.param(
        {
            "messages": [
                pb.ChatMessage(
                    role=pb.ROLE_USER,
                    content="hi",
                    tool_calls=[pb.ToolCall(id="c", name="n", arguments="{}")],
                )
            ]
        },
        "messages[0].tool_calls",
        "MISPLACED_TOOL_CALLS",
        "only in ROLE_ASSISTANT",
        id="calls-on-user",
    ),
    pytest.param(
        {"messages": [user("hi"), assistant_call("c"), assistant_call("c")]},
        "messages[2].tool_calls[0].id",
        "DUPLICATE_TOOL_CALL_ID",
        "used twice",
        id="dup-call-id",
    ),
    pytest.param(
        {"messages": [user("hi"), assistant_call("")]},
        "messages[1].tool_calls[0].id",
        "INVALID_TOOL_CALL",
        "must not be empty",
        id="call-empty-id",
    ),
    pytest.param(
        {"messages": [user("hi"), assistant_call("c", "")]},
        "messages[1].tool_calls[0].name",
        "INVALID_TOOL_CALL",
        "must not be empty",
        id="call-empty-name",
    ),
    pytest.param(
        {"messages": [pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="")]},
        "messages[0].content",
        "EMPTY_CONTENT",
        "must not be empty",
        id="assistant-empty-no-calls",
    ),
]


@pytest.mark.parametrize(("fields", "field", "reason", "words"), BAD)
async def test_bad_structured_requests_are_refused_with_the_field(
    server: RunningServer, fields: dict[str, Any], field: str, reason: str, words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Respond(respond_request(**fields))
    details = status_details(raised.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == reason
    violations = {v.field: v.description for v in details.bad_request.field_violations}
    assert field in violations, violations
    assert words in violations[field]


async def test_every_problem_is_named_at_once_on_the_stream_call(server: RunningServer) -> None:
    request = stream_request(
        tools=[tool("ok", WEATHER), tool("bad name", {"type": 3})],
        tool_choice=pb.ToolChoice(function_name="nope"),
        messages=[user("hi"), tool_answer("missing")],
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in server.stub.StreamRespond(request):
            pass
    fields = {v.field for v in status_details(raised.value).bad_request.field_violations}
    assert fields == {
        "tools[1].name",
        "tools[1].parameters",
        "tool_choice.function_name",
        "messages[1].tool_call_id",
    }


async def test_role_error_names_every_role(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Respond(respond_request(messages=[pb.ChatMessage(role=0, content="x")]))
    (violation,) = status_details(raised.value).bad_request.field_violations
    assert "ROLE_TOOL" in violation.description


def parse(server: RunningServer, request: pb.RespondRequest) -> ParsedCall:
    """The mapping the server does, on the running server's own registry."""
    return parse_call(request, server.config, server.server.registry, None)


async def test_a_good_request_maps_to_domain_objects_with_integers(server: RunningServer) -> None:
    request = respond_request(
        tools=[tool("get_weather", WEATHER), tool("noop")],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            schema_name="answer",
            json_schema=struct({"type": "array", "maxItems": 3, "items": {"minimum": 1.5}}),
            strict=True,
        ),
        messages=[
            user("weather?"),
            assistant_call("call_1"),
            tool_answer("call_1", content=""),  # an empty tool result is allowed
        ],
    )
    generation = parse(server, request).generation
    assert [t.name for t in generation.tools] == ["get_weather", "noop"]
    days = generation.tools[0].parameters["properties"]["days"]
    assert days["maximum"] == 7 and isinstance(days["maximum"], int)
    assert generation.tools[1].parameters is None
    assert generation.tool_choice.mode.name == "REQUIRED"
    fmt = generation.response_format
    assert fmt.is_json and fmt.strict and fmt.schema_name == "answer"
    assert isinstance(fmt.schema["maxItems"], int) and fmt.schema["items"]["minimum"] == 1.5
    assert generation.messages[1].tool_calls[0].id == "call_1"
    assert generation.messages[2].tool_call_id == "call_1"
    # And the server accepts it (the simulator ignores the tools).
    await server.stub.Respond(request)


async def test_plain_and_text_requests_keep_the_plain_path(server: RunningServer) -> None:
    request = respond_request(
        response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT),
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE),
    )
    generation = parse(server, request).generation
    assert generation.response_format is None and generation.tools == ()
    assert generation.tool_choice is not None and generation.tool_choice.mode.name == "NONE"
