"""The request's tools, tool choice, response format and the tool turns of its
conversation, checked and mapped to domain objects (validation.py calls these).

Each problem goes to `add(field, description, reason)`, so it joins the one
BadRequest that names every offending field. Schemas are checked against
their draft's metaschema here, once, so an answer is never checked against a
schema that cannot work; the violation names the bad keyword's pointer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import (
    ResponseFormat,
    ResponseFormatType,
    Role,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from tokenwire_server.structured.schemas import schema_problem, struct_to_json

#: (field, description, ErrorInfo reason)
Add = Callable[[str, str, str], None]

MAX_TOOLS = 128
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_RULE = f"1 to {MAX_NAME} characters of a-z, A-Z, 0-9, _ and -"
_CHOICE_MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
}
_FORMATS = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}


def _name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters; at most {MAX_NAME}"
    if _NAME.fullmatch(name) is None:
        return f"must be {_NAME_RULE}"
    return None


def parse_tools(tools: Sequence[pb.Tool], add: Add) -> tuple[ToolSpec, ...]:
    if len(tools) > MAX_TOOLS:
        add("tools", f"{len(tools)} tools; at most {MAX_TOOLS}", "TOO_MANY_TOOLS")
        return ()
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        problem = _name_problem(tool.name)
        if problem is not None:
            add(f"tools[{index}].name", problem, "INVALID_TOOL_NAME")
        elif tool.name in seen:
            add(f"tools[{index}].name", f"{tool.name!r} is named twice", "DUPLICATE_TOOL_NAME")
        seen.add(tool.name)
        parameters = struct_to_json(tool.parameters) if tool.HasField("parameters") else None
        if parameters:
            problem = schema_problem(parameters)
            if problem is not None:
                add(f"tools[{index}].parameters", problem, "INVALID_TOOL_SCHEMA")
        specs.append(ToolSpec(tool.name, tool.description, parameters or None, tool.strict))
    return tuple(specs)


def parse_tool_choice(
    choice: pb.ToolChoice, tools: Sequence[ToolSpec], add: Add
) -> ToolChoice | None:
    which = choice.WhichOneof("choice")
    if which == "function_name":
        name = choice.function_name
        if not tools:
            add("tool_choice.function_name", "needs the request's tools", "TOOL_CHOICE_NO_TOOLS")
        elif all(tool.name != name for tool in tools):
            add(
                "tool_choice.function_name",
                f"{name!r} is not one of the request's tools",
                "UNKNOWN_TOOL_CHOICE",
            )
        return ToolChoice(ToolChoiceMode.REQUIRED, name)
    if which is None:
        return None
    mode = _CHOICE_MODES.get(choice.mode)
    if mode is None:
        add("tool_choice.mode", "must be AUTO, NONE or REQUIRED", "INVALID_TOOL_CHOICE")
        return None
    if mode is ToolChoiceMode.REQUIRED and not tools:
        add("tool_choice.mode", "REQUIRED needs the request's tools", "TOOL_CHOICE_NO_TOOLS")
    return ToolChoice(mode)


def parse_response_format(fmt: pb.ResponseFormat, add: Add) -> ResponseFormat | None:
    """None for free text (the plain path)."""
    kind = _FORMATS.get(fmt.type)
    if kind is None:
        add(
            "response_format.type",
            "must be TEXT, JSON_OBJECT or JSON_SCHEMA",
            "INVALID_RESPONSE_FORMAT",
        )
        return None
    has_schema = fmt.HasField("json_schema") and len(fmt.json_schema.fields) > 0
    if kind is not ResponseFormatType.JSON_SCHEMA:
        for name, present in (("schema_name", bool(fmt.schema_name)), ("json_schema", has_schema)):
            if present:
                add(
                    f"response_format.{name}",
                    "only with RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
                    "INVALID_RESPONSE_FORMAT",
                )
        return None if kind is ResponseFormatType.TEXT else ResponseFormat(kind, strict=fmt.strict)
    if fmt.schema_name and (problem := _name_problem(fmt.schema_name)) is not None:
        add("response_format.schema_name", problem, "INVALID_RESPONSE_FORMAT")
    if not has_schema:
        add(
            "response_format.json_schema",
            "required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
            "INVALID_RESPONSE_FORMAT",
        )
        return None
    schema = struct_to_json(fmt.json_schema)
    problem = schema_problem(schema)
    if problem is not None:
        add("response_format.json_schema", problem, "INVALID_RESPONSE_SCHEMA")
    return ResponseFormat(kind, fmt.schema_name, schema, fmt.strict)


def parse_tool_turn(
    index: int, message: pb.ChatMessage, role: Role | None, call_ids: set[str], add: Add
) -> tuple[tuple[ToolCall, ...], str]:
    """The slow path of one conversation message: it has tool calls, a
    `tool_call_id`, or is a tool's answer. `call_ids` collects the ids of the
    assistant calls so far (a tool's answer must name an earlier one)."""
    where = f"messages[{index}]"
    calls: list[ToolCall] = []
    if message.tool_calls and role is not Role.ASSISTANT:
        add(f"{where}.tool_calls", "only in ROLE_ASSISTANT messages", "MISPLACED_TOOL_CALLS")
    for number, call in enumerate(message.tool_calls):
        at = f"{where}.tool_calls[{number}]"
        if not call.id:
            add(f"{at}.id", "must not be empty", "INVALID_TOOL_CALL")
        elif call.id in call_ids:
            add(f"{at}.id", f"{call.id!r} is used twice", "DUPLICATE_TOOL_CALL_ID")
        if not call.name:
            add(f"{at}.name", "must not be empty", "INVALID_TOOL_CALL")
        call_ids.add(call.id)
        calls.append(ToolCall(call.id, call.name, call.arguments))
    if role is Role.TOOL:
        if not message.tool_call_id:
            add(f"{where}.tool_call_id", "required with ROLE_TOOL", "MISSING_TOOL_CALL_ID")
        elif message.tool_call_id not in call_ids:
            add(
                f"{where}.tool_call_id",
                f"{message.tool_call_id!r} names no tool call of an earlier assistant message",
                "UNKNOWN_TOOL_CALL_ID",
            )
    elif message.tool_call_id:
        add(f"{where}.tool_call_id", "only in ROLE_TOOL messages", "MISPLACED_TOOL_CALL_ID")
    return tuple(calls), message.tool_call_id
