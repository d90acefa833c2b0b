"""Tool calls through the real surface (issue 23): an OpenAI-compatible upstream
over real HTTP streams fragmented calls; callers see them as governed
`ToolCallDelta` chunks under the one sequence, whole in BUFFERED and unary,
final in `Completed.tool_calls`, verified per call, replayed on resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from google.protobuf import json_format, struct_pb2

from tests.conftest import StartServer, chunks_of, collect, completed_of, stream_request
from tests.test_openai_upstream import route, sse
from tests.test_structured_escalation import POLICY
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.audit.reader import read_history

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    json_format.ParseDict(value, message)
    return message


def tools() -> list[pb.Tool]:
    return [
        pb.Tool(name="get_weather", description="Weather by city", parameters=struct(WEATHER)),
        pb.Tool(name="send_mail", parameters=struct({"type": "object"})),
    ]


def delta_event(delta: dict[str, Any], finish: str | None = None) -> str:
    event = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return "data: " + json.dumps(event) + "\n\n"


def call_events(calls: list[tuple[str, str, str]], text: str = "", pieces: int = 5) -> list[str]:
    """SSE events for `text` and then each (id, name, arguments) in fragments:
    id and name on the first delta only, the arguments cut every `pieces` chars."""
    events = [delta_event({"role": "assistant", "content": text})] if text else []
    for index, (call_id, name, arguments) in enumerate(calls):
        events.append(
            delta_event(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
        )
        for start in range(0, len(arguments), pieces):
            fragment = {
                "index": index,
                "function": {"arguments": arguments[start : start + pieces]},
            }
            events.append(delta_event({"tool_calls": [fragment]}))
    events.append(delta_event({}, "tool_calls"))
    events.append("data: [DONE]\n\n")
    return events


async def tool_server(start_server: StartServer, upstream: Any, events: list[str], **options: Any):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, events)

    up = await upstream(handler)
    return await start_server(upstreams=(route(up.url),), **options), up


def request(**fields: Any) -> pb.StreamRespondRequest:
    fields.setdefault("tools", tools())
    return stream_request(
        "What is the weather in Oslo?",
        model="up-model",
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        **fields,
    )


def assembled(chunks: list[pb.TokenChunk]) -> dict[int, tuple[str, str, str]]:
    """Calls rebuilt from fragments, checking each fragment's offset on the way."""
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for chunk in chunks:
        if not chunk.HasField("tool_call"):
            continue
        delta = chunk.tool_call
        assert chunk.text == ""
        if delta.index not in calls:
            assert delta.id and delta.name, "a call's first fragment names it"
            assert delta.index == len(calls), "calls are numbered in the order they began"
            calls[delta.index], heads[delta.index] = [], (delta.id, delta.name)
        else:
            assert not delta.id and not delta.name
        held = "".join(calls[delta.index]).encode()
        assert delta.arguments_offset == len(held)
        calls[delta.index].append(delta.arguments)
    return {i: (*heads[i], "".join(parts)) for i, parts in calls.items()}


async def test_streams_fragmented_calls_under_one_sequence(
    start_server: StartServer, upstream: Any, tmp_path: Path
) -> None:
    arguments = [('{"city": "Oslo", "days": 3}'), '{"to": "ops@example.org"}']
    events = call_events(
        [("call_a", "get_weather", arguments[0]), ("call_b", "send_mail", arguments[1])],
        text="Let me check. ",
    )
    audit = tmp_path / "audit.sqlite3"
    running, up = await tool_server(start_server, upstream, events, audit_path=audit)
    got = await collect(running.stub.StreamRespond(request()))
    chunks = chunks_of(got)
    completed = completed_of(got)

    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    text = "".join(c.text for c in chunks if not c.HasField("tool_call"))
    assert text == completed.final_text == "Let me check. "
    # text_offset counts text bytes only, so every fragment sits at the end of the text
    assert all(c.text_offset == len(text) for c in chunks if c.HasField("tool_call"))
    calls = assembled(chunks)
    assert calls[0][:2] == ("call_a", "get_weather")
    assert calls[0][2] == arguments[0]
    assert calls[1][1] == "send_mail"
    assert [(c.id, c.name, c.arguments) for c in completed.tool_calls] == [
        calls[0],
        calls[1],
    ]
    assert completed.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    sent = up.requests[0]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "send_mail"]
    # the audit row names the calls and digests their arguments, never holds them
    row = read_history(audit, completed.response_id)[-1]
    called = [a for a in row["actions"] if "tool_call" in a]
    assert [(a["tool_call"], a["id"]) for a in called] == [
        ("get_weather", "call_a"),
        ("send_mail", "call_b"),
    ]
    assert called[1]["arguments_sha256"] == hashlib.sha256(arguments[1].encode()).hexdigest()
    assert "ops@example.org" not in json.dumps(row)


@pytest.mark.parametrize("mode", [pb.DELIVERY_MODE_BUFFERED, "unary"])
async def test_buffered_and_unary_deliver_whole_calls(
    start_server: StartServer, upstream: Any, mode: Any
) -> None:
    arguments = '{"city": "Bergen"}'
    running, _ = await tool_server(
        start_server, upstream, call_events([("call_w", "get_weather", arguments)])
    )
    if mode == "unary":
        answer = await running.stub.Respond(
            pb.RespondRequest(
                model="up-model",
                messages=request().messages,
                tools=tools(),
            )
        )
        completed = answer.completed
        assert completed.chunk_count == 0
    else:
        got = await collect(running.stub.StreamRespond(request(delivery_mode=mode)))
        chunks = chunks_of(got)
        completed = completed_of(got)
        assert len(chunks) == 1, "no text: one chunk, the whole call"
        assert chunks[0].tool_call.arguments == arguments
        assert chunks[0].tool_call.arguments_offset == 0
        assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    assert [(c.id, c.name, c.arguments) for c in completed.tool_calls] == [
        ("call_w", "get_weather", arguments)
    ]
    assert completed.final_text == ""
    assert completed.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_resume_replays_fragments_like_text(start_server: StartServer, upstream: Any) -> None:
    arguments = '{"city": "Tromsø", "days": 2}'
    running, _ = await tool_server(
        start_server, upstream, call_events([("call_r", "get_weather", arguments)], text="Hm. ")
    )
    first = await collect(running.stub.StreamRespond(request()))
    chunks, completed = chunks_of(first), completed_of(first)
    # the caller holds the text and the call's first two fragments, and resumes
    held = next(c.sequence for c in chunks if c.HasField("tool_call")) + 1
    resumed = await collect(
        running.stub.StreamRespond(
            pb.StreamRespondRequest(
                resume=pb.ResumeFrom(response_id=completed.response_id, after_sequence=held)
            )
        )
    )
    rest = chunks_of(resumed)
    assert [c.sequence for c in rest] == list(range(held + 1, len(chunks) + 1))
    assert rest == chunks[held:]
    again = completed_of(resumed)
    assert again.tool_calls == completed.tool_calls
    assert again.verification.status == pb.VERIFICATION_STATUS_VERIFIED


def check_named(completed: pb.Completed, name: str) -> pb.VerificationCheck:
    found = [c for c in completed.verification.checks if c.name == name]
    assert len(found) == 1, completed.verification
    return found[0]


async def test_arguments_are_checked_against_the_tool_schema(
    start_server: StartServer, upstream: Any
) -> None:
    events = call_events(
        [
            ("call_1", "get_weather", '{"city": "Oslo"}'),
            ("call_2", "get_weather", '{"city": 5, "hours": 1}'),
            ("call_3", "get_weather", '{"city": "Oslo"'),
        ]
    )
    running, _ = await tool_server(start_server, upstream, events)
    completed = completed_of(await collect(running.stub.StreamRespond(request())))
    check = check_named(completed, "tool_arguments")
    assert check.outcome == pb.CHECK_OUTCOME_FAILED
    pointers = {v.json_pointer for v in check.violations}
    assert "/1/city" in pointers  # a string was required
    assert any(p.startswith("/1") and v.code for p in pointers for v in check.violations)
    assert any(v.json_pointer.startswith("/2") for v in check.violations)  # not JSON
    assert not any(v.json_pointer.startswith("/0") for v in check.violations)
    assert completed.verification.checks_passed is False
    assert check_named(completed, "integrity").outcome == pb.CHECK_OUTCOME_PASSED
    # the calls are still delivered as the model made them: the check says what is wrong
    assert len(completed.tool_calls) == 3


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ('{"city": "Oslo", "days": 2}', pb.CHECK_OUTCOME_PASSED),
        ('{"city": "Oslo", "days": "two"}', pb.CHECK_OUTCOME_FAILED),
        ("Sure! Here is the JSON", pb.CHECK_OUTCOME_FAILED),
    ],
)
async def test_structured_output_is_checked_against_response_format(
    start_server: StartServer, text: str, outcome: int
) -> None:
    running = await start_server()
    completed = completed_of(
        await collect(
            running.stub.StreamRespond(
                stream_request(
                    text,
                    model="echo",
                    response_format=pb.ResponseFormat(
                        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                        schema_name="weather",
                        json_schema=struct(WEATHER),
                    ),
                )
            )
        )
    )
    assert completed.final_text == text
    check = check_named(completed, "json_schema")
    assert check.outcome == outcome
    assert completed.verification.checks_passed is (outcome == pb.CHECK_OUTCOME_PASSED)
    if "two" in text:
        assert [v.json_pointer for v in check.violations] == ["/days"]


async def test_secrets_inside_argument_strings_are_redacted_and_the_json_stays_valid(
    start_server: StartServer,
) -> None:
    """The simulator's scripted call (`tokenwire.sim/tool-calls`) with values a
    raw-text scan would miss or break: an email right after a `\\n` escape, an
    access key spelled with a `\\u` escape, and an email split across fragments."""
    arguments = (
        '{"to": "ops:\\nbob@example.com", "note": "key \\u0041KIAIOSFODNN7EXAMPLE",'
        ' "cc": ["alice.smith@example.org"]}'
    )
    running = await start_server(policy="builtin:default")
    script = json.dumps([{"name": "send_mail", "arguments": arguments}])
    got = await collect(
        running.stub.StreamRespond(
            stream_request(
                "mail them",
                tools=tools(),
                labels={"tokenwire.sim/tool-calls": script},
                chunking=pb.Chunking(max_tokens_per_chunk=1),
            )
        )
    )
    completed = completed_of(got)
    (call,) = completed.tool_calls
    assert call.name == "send_mail"
    value = json.loads(call.arguments)  # still JSON
    flat = json.dumps(value)
    for secret in ("bob@example.com", "AKIAIOSFODNN7EXAMPLE", "alice.smith@example.org"):
        assert secret not in flat
    assert value["to"].startswith("ops:\n")
    assert completed.verdict == pb.VERDICT_REDACTED
    assert assembled(chunks_of(got))[0][2] == call.arguments
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_strict_output_stops_as_soon_as_it_cannot_become_valid(
    start_server: StartServer,
) -> None:
    running = await start_server()
    text = "Sure! Here it is: " + "and more words " * 100
    got = await collect(
        running.stub.StreamRespond(
            stream_request(
                text,
                model="echo",
                labels={"tokenwire.sim/echo-token-chars": "4"},
                response_format=pb.ResponseFormat(
                    type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                    json_schema=struct(WEATHER),
                    strict=True,
                ),
            )
        )
    )
    completed = completed_of(got)
    assert completed.finish_reason == pb.FINISH_REASON_INVALID_OUTPUT
    assert completed.usage.completion_tokens <= 2, "stopped at the first token"
    assert "more words" not in completed.final_text
    check = check_named(completed, "json_schema")
    assert check.outcome == pb.CHECK_OUTCOME_FAILED and check.violations
    assert completed.verification.checks_passed is False
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_a_strict_tool_call_stops_at_the_first_impossible_argument(
    start_server: StartServer,
) -> None:
    strict_tools = [
        pb.Tool(name="get_weather", parameters=struct(WEATHER), strict=True),
    ]
    arguments = '{"city": 5, "days": 1, "padding": "' + "x" * 400 + '"}'
    running = await start_server()
    script = json.dumps([{"name": "get_weather", "arguments": arguments}])
    got = await collect(
        running.stub.StreamRespond(
            stream_request(
                "weather?",
                tools=strict_tools,
                labels={"tokenwire.sim/tool-calls": script},
            )
        )
    )
    completed = completed_of(got)
    assert completed.finish_reason == pb.FINISH_REASON_INVALID_OUTPUT
    check = check_named(completed, "tool_arguments")
    assert check.outcome == pb.CHECK_OUTCOME_FAILED
    assert [v.json_pointer for v in check.violations] == ["/0/city"]
    # the call so far is delivered and verified; nothing after the bad value was paid for
    (call,) = completed.tool_calls
    assert "padding" not in call.arguments
    assert completed.usage.completion_tokens < 10
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


@pytest.mark.parametrize(
    ("choice", "model", "script", "code"),
    [
        (
            pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE),
            "tokenwire-sim",
            True,
            "TOOL_CALL_NOT_ALLOWED",
        ),
        (pb.ToolChoice(function_name="send_mail"), "tokenwire-sim", True, "WRONG_TOOL"),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), "echo", False, "NO_TOOL_CALL"),
    ],
    ids=["none-but-called", "wrong-tool", "required-but-text"],
)
async def test_an_ignored_tool_choice_is_reported(
    start_server: StartServer, choice: pb.ToolChoice, model: str, script: bool, code: str
) -> None:
    running = await start_server()
    labels = {}
    if script:
        calls = [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
        labels["tokenwire.sim/tool-calls"] = json.dumps(calls)
    completed = completed_of(
        await collect(
            running.stub.StreamRespond(
                stream_request(
                    "weather?", model=model, tools=tools(), tool_choice=choice, labels=labels
                )
            )
        )
    )
    check = check_named(completed, "tool_arguments")
    assert check.outcome == pb.CHECK_OUTCOME_FAILED
    assert [v.code for v in check.violations] == [code]
    assert completed.verification.checks_passed is False


async def test_a_call_to_a_tool_an_escalation_rule_names_is_held_for_review(
    start_server: StartServer, tmp_path: Path
) -> None:
    """`when: {tools: [transfer_funds]}` with `action: hold`: the request offers the
    tool, so nothing leaves before the decision (BUFFERED); the model calls it,
    so the response is held: no chunk, no call, a pending review."""
    policy = tmp_path / "bank.yaml"
    policy.write_text(POLICY)
    running = await start_server(policy=str(policy))
    offered = [
        pb.Tool(name="transfer_funds", parameters=struct({"type": "object"})),
        *tools(),
    ]

    async def call(name: str) -> list[pb.StreamRespondResponse]:
        script = json.dumps([{"name": name, "arguments": '{"amount": 10}'}])
        return await collect(
            running.stub.StreamRespond(
                stream_request(
                    "move money",
                    tools=offered,
                    labels={"tokenwire.sim/tool-calls": script},
                )
            )
        )

    held = await call("transfer_funds")
    completed = completed_of(held)
    assert completed.review.held and completed.review.state == pb.REVIEW_STATE_PENDING
    assert completed.review.review_id
    assert chunks_of(held) == [] and list(completed.tool_calls) == []
    assert completed.final_text == ""
    assert completed.delivery_mode == pb.DELIVERY_MODE_BUFFERED
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    # the same request calling another tool is not held: its call arrives whole
    other = await call("send_mail")
    completed = completed_of(other)
    assert not completed.HasField("review")
    assert [c.name for c in completed.tool_calls] == ["send_mail"]
    assert [c.tool_call.name for c in chunks_of(other)] == ["send_mail"]
