"""Tool calls and structured output from plain Python values.

The request messages want `google.protobuf.Struct` for JSON Schemas and enums
for the choices; these helpers take what callers already have, OpenAI-style
dicts included:

    from tokenwire.tools import tool_result_message, assistant_message
    stream = client.stream(
        "Weather in Paris?",
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
        tool_choice="required",
    )
    result = stream.collect()
    follow_up = [
        pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?"),
        assistant_message(result.text, result.tool_calls),
        tool_result_message(result.tool_calls[0].id, {"temperature_c": 21}),
    ]

`build_stream_request` and `build_respond_request` (and so `stream`/`respond`)
take `tools`, `tool_choice` and `response_format` in any form these accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from tokenwire.stream import ToolCall
from tokenwire.v1 import respond_pb2 as pb

#: A tool: the message, `{"type": "function", "function": {...}}` or bare `{"name": ...}`.
ToolSpec = pb.Tool | Mapping[str, Any]
#: `auto`, `none`, `required`, a tool's name, `{"type": "function", "function":
#: {"name": ...}}`, or the message.
ToolChoiceSpec = str | Mapping[str, Any] | pb.ToolChoice
#: `text`, `json_object`, OpenAI's `{"type": "json_schema", "json_schema": {...}}` /
#: `{"type": "json_object"}`, or the message.
ResponseFormatSpec = str | Mapping[str, Any] | pb.ResponseFormat

_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object (a JSON Schema, say) as a `Struct`. Numbers become doubles,
    as JSON's do: `1` reads back as `1.0`."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(value)))  # rejects what JSON cannot hold
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A `Struct` back as plain Python values."""
    from google.protobuf import json_format

    value = json_format.MessageToDict(struct)
    assert isinstance(value, dict)
    return value


def tool(spec: ToolSpec, *, strict: bool | None = None) -> pb.Tool:
    """One tool from `{"type": "function", "function": {"name", "description",
    "parameters", "strict"}}` or the bare `{"name", ...}`; `strict`, when given,
    applies where the spec does not say."""
    if isinstance(spec, pb.Tool):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"a tool is a JSON object, got {type(spec).__name__}")
    body: Mapping[str, Any] = spec
    if "function" in spec:
        kind = spec.get("type", "function")
        if kind != "function":
            raise ValueError(f"tool type {kind!r}: only function tools are supported")
        body = spec["function"]
        if not isinstance(body, Mapping):
            raise TypeError("a tool's function is a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool needs a name: {dict(spec)!r}")
    message = pb.Tool(name=name, description=str(body.get("description") or ""))
    parameters = body.get("parameters")
    if parameters is not None:
        message.parameters.CopyFrom(to_struct(parameters))
    own = body.get("strict")
    message.strict = bool(own) if own is not None else bool(strict)
    return message


def tools(specs: Iterable[ToolSpec], *, strict: bool | None = None) -> list[pb.Tool]:
    """`tool` for each of `specs`."""
    if isinstance(specs, Mapping):
        raise TypeError("tools is a list of tools, not one")
    return [tool(spec, strict=strict) for spec in specs]


def tool_choice(choice: ToolChoiceSpec) -> pb.ToolChoice:
    """`auto`, `none`, `required`, or the name of the tool the model must call."""
    if isinstance(choice, pb.ToolChoice):
        return choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        if isinstance(function, Mapping) and function.get("name"):
            return pb.ToolChoice(function_name=str(function["name"]))
        if choice.get("name"):
            return pb.ToolChoice(function_name=str(choice["name"]))
        raise ValueError(f"tool choice {dict(choice)!r} names no function")
    if not choice:
        raise ValueError("an empty tool choice")
    mode = _MODES.get(choice.lower())
    return pb.ToolChoice(mode=mode) if mode is not None else pb.ToolChoice(function_name=choice)


def json_schema_format(
    schema: Mapping[str, Any], *, name: str = "", strict: bool = False
) -> pb.ResponseFormat:
    """The text must be JSON valid against `schema` (`strict`: stop early once it cannot be)."""
    return pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name=name,
        json_schema=to_struct(schema),
        strict=strict,
    )


def json_object_format(*, strict: bool = False) -> pb.ResponseFormat:
    """The text must be one JSON object."""
    return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, strict=strict)


def schema_document(document: Mapping[str, Any], *, strict: bool = False) -> pb.ResponseFormat:
    """A JSON_SCHEMA format from a file's content: a bare JSON Schema, OpenAI's
    `{"name", "schema", "strict"}`, or the whole `{"type": "json_schema",
    "json_schema": {...}}`. `strict` applies where the document does not say."""
    if document.get("type") == "json_schema" and isinstance(document.get("json_schema"), Mapping):
        document = document["json_schema"]
    schema = document.get("schema")
    if isinstance(schema, Mapping) and set(document) <= {"name", "schema", "strict", "description"}:
        own = document.get("strict")
        return json_schema_format(
            schema,
            name=str(document.get("name") or ""),
            strict=bool(own) if own is not None else strict,
        )
    return json_schema_format(document, strict=strict)


def response_format(spec: ResponseFormatSpec) -> pb.ResponseFormat:
    """`text`, `json_object`, or an OpenAI-style response_format dict."""
    if isinstance(spec, pb.ResponseFormat):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    kind = spec.get("type")
    if kind == "text":
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT)
    if kind == "json_object":
        return json_object_format(strict=bool(spec.get("strict", False)))
    if kind == "json_schema":
        return schema_document(spec)
    raise ValueError(f"response format type {kind!r}: expected text, json_object or json_schema")


def tool_result_message(tool_call_id: str, content: Any) -> pb.ChatMessage:
    """A tool's answer (ROLE_TOOL) to the call `tool_call_id`; anything but a
    string is sent as JSON."""
    if not tool_call_id:
        raise ValueError("a tool result needs the id of the call it answers")
    text = content if isinstance(content, str) else json.dumps(content)
    return pb.ChatMessage(role=pb.ROLE_TOOL, content=text, tool_call_id=tool_call_id)


def assistant_message(
    content: str = "", tool_calls: Iterable[ToolCall | pb.ToolCall | Mapping[str, Any]] = ()
) -> pb.ChatMessage:
    """An earlier assistant turn, with the tool calls it made (`Result.tool_calls`)."""
    calls: list[pb.ToolCall] = []
    for call in tool_calls:
        if isinstance(call, ToolCall):
            calls.append(call.to_proto())
        elif isinstance(call, pb.ToolCall):
            calls.append(call)
        else:
            function = call.get("function", call)
            arguments = function.get("arguments", "")
            calls.append(
                pb.ToolCall(
                    id=str(call.get("id", "")),
                    name=str(function.get("name", "")),
                    arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
                )
            )
    return pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=content, tool_calls=calls)
