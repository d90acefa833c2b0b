"""Tool calls and structured output in the Python client: fragments assembled
next to the text, checked like chunks (sequence, offsets, resume, retraction),
the request helpers, and `tokenwire ask --tools / --json-schema`, against the
fake RespondService (nothing of tokenwire_server)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_respond import RESPONSE_ID, FakeServer, fail

from tokenwire import (
    Chunk,
    Client,
    IntegrityError,
    ProtocolError,
    Retraction,
    ToolCall,
    ToolCallFragment,
    assistant_message,
    tool_result_message,
)
from tokenwire import cli as tokenwire_cli
from tokenwire.stream import StreamAssembler
from tokenwire.tools import (
    from_struct,
    response_format,
    schema_document,
    tool_choice,
    tools,
)
from tokenwire.v1 import respond_pb2 as pb

Piece = str | tuple[int, str]
CALLS = {0: ("call_0", "get_weather"), 1: ("call_1", "get_time")}
#: Text, then call #0 in three fragments with call #1 between them, then text.
PIECES: list[Piece] = [
    "Let me ",
    "check. ",
    (0, '{"city": '),
    (1, '{"tz": "CET"}'),
    (0, '"Paris", '),
    (0, '"unit": "°C"}'),
    "Done.",
]


def script(
    pieces: list[Piece], calls: dict[int, tuple[str, str]] = CALLS
) -> list[pb.StreamRespondResponse]:
    """The chunks of `pieces` (text, or (call index, arguments fragment)) with
    the sequences and offsets a correct server sends."""
    events = []
    text_offset = 0
    held: dict[int, int] = {}
    for sequence, piece in enumerate(pieces, start=1):
        chunk = pb.TokenChunk(
            response_id=RESPONSE_ID, sequence=sequence, text_offset=text_offset, token_count=1
        )
        if isinstance(piece, str):
            chunk.text = piece
            text_offset += len(piece.encode())
        else:
            index, arguments = piece
            delta = pb.ToolCallDelta(
                index=index, arguments=arguments, arguments_offset=held.get(index, 0)
            )
            if index not in held:
                delta.id, delta.name = calls[index]
            held[index] = held.get(index, 0) + len(arguments.encode())
            chunk.tool_call.CopyFrom(delta)
        events.append(pb.StreamRespondResponse(chunk=chunk))
    return events


def final_calls(
    pieces: list[Piece], calls: dict[int, tuple[str, str]] = CALLS
) -> list[pb.ToolCall]:
    arguments: dict[int, str] = {}
    for piece in pieces:
        if not isinstance(piece, str):
            arguments[piece[0]] = arguments.get(piece[0], "") + piece[1]
    return [
        pb.ToolCall(id=calls[i][0], name=calls[i][1], arguments=arguments[i])
        for i in sorted(arguments)
    ]


def completed(
    pieces: list[Piece],
    *,
    text: str | None = None,
    tool_calls: list[pb.ToolCall] | None = None,
    retract_from: int = 0,
    checks: list[pb.VerificationCheck] = (),  # type: ignore[assignment]
) -> pb.StreamRespondResponse:
    streamed = "".join(p for p in pieces if isinstance(p, str))
    final = streamed if text is None else text
    calls = final_calls(pieces) if tool_calls is None else tool_calls
    return pb.StreamRespondResponse(
        completed=pb.Completed(
            response_id=RESPONSE_ID,
            final_text=final,
            final_sha256=hashlib.sha256(final.encode()).hexdigest(),
            chunk_count=len(pieces),
            last_sequence=len(pieces),
            delivery_mode=pb.DELIVERY_MODE_STREAM,
            finish_reason=pb.FINISH_REASON_TOOL_CALLS if calls else pb.FINISH_REASON_STOP,
            verdict=pb.VERDICT_ALLOWED,
            tool_calls=calls,
            verification=pb.Verification(
                status=pb.VERIFICATION_STATUS_DIVERGED
                if retract_from
                else pb.VERIFICATION_STATUS_VERIFIED,
                retract_from_sequence=retract_from,
                checks=list(checks),
                checks_passed=all(c.outcome == pb.CHECK_OUTCOME_PASSED for c in checks),
            ),
        )
    )


def feed_all(assembler: StreamAssembler, messages: list[pb.StreamRespondResponse]) -> list[Any]:
    events: list[Any] = []
    for message in messages:
        events.extend(assembler.feed(message))
    return events


def fragment_message(
    sequence: int, index: int, arguments: str, offset: int, text_offset: int, **ids: str
) -> pb.StreamRespondResponse:
    return pb.StreamRespondResponse(
        chunk=pb.TokenChunk(
            response_id=RESPONSE_ID,
            sequence=sequence,
            text_offset=text_offset,
            tool_call=pb.ToolCallDelta(
                index=index, arguments=arguments, arguments_offset=offset, **ids
            ),
        )
    )


# ---------------------------------------------------------------- the assembler


def test_fragments_assemble_into_calls_next_to_the_text() -> None:
    assembler = StreamAssembler()
    messages = script(PIECES)
    seen: list[list[ToolCall]] = []
    texts: list[str] = []
    events: list[Any] = []
    for message in messages:
        events.extend(assembler.feed(message))
        seen.append(assembler.tool_calls)
        texts.append(assembler.text)
    # As they form: after chunk 5, call #0 holds two fragments and #1 is whole.
    assert seen[4] == [
        ToolCall(0, "call_0", "get_weather", '{"city": "Paris", '),
        ToolCall(1, "call_1", "get_time", '{"tz": "CET"}'),
    ]
    assert texts[5] == "Let me check. "  # fragments add no text
    fragments = [e for e in events if isinstance(e, ToolCallFragment)]
    assert [(f.sequence, f.index, f.arguments_offset, f.first) for f in fragments] == [
        (3, 0, 0, True),
        (4, 1, 0, True),
        (5, 0, 9, False),
        (6, 0, 18, False),
    ]
    assert fragments[2].call.arguments == '{"city": "Paris", '
    # The text after the calls starts where the text before them ended.
    last_chunk = [e for e in events if isinstance(e, Chunk)][-1]
    assert last_chunk.text_offset == len(b"Let me check. ")

    events = assembler.feed(completed(PIECES))
    result = events[-1].result
    assert result.verified and result.text == "Let me check. Done."
    assert result.tool_calls == (
        ToolCall(0, "call_0", "get_weather", '{"city": "Paris", "unit": "°C"}', complete=True),
        ToolCall(1, "call_1", "get_time", '{"tz": "CET"}', complete=True),
    )
    assert assembler.tool_calls == list(result.tool_calls)
    assert result.tool_calls[0].parsed_arguments() == {"city": "Paris", "unit": "°C"}


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        # arguments_offset past what is held: a gap in the call's arguments
        (fragment_message(4, 0, '"x"}', 20, 14), "offset_mismatch"),
        # arguments_offset inside what is held
        (fragment_message(4, 0, '"x"}', 3, 14), "offset_mismatch"),
        # a fragment that advanced text_offset by its arguments
        (fragment_message(4, 0, '"x"}', 9, 23), "offset_mismatch"),
        # sequence skipped
        (fragment_message(5, 0, '"x"}', 9, 14), "sequence_gap"),
        # the fragment replayed under its own sequence
        (fragment_message(3, 0, '{"city": ', 0, 14, id="call_0", name="get_weather"),
         "sequence_repeat"),
    ],
)  # fmt: skip
def test_a_misplaced_fragment_is_an_ordering_violation(
    bad: pb.StreamRespondResponse, kind: str
) -> None:
    heard: list[str] = []
    assembler = StreamAssembler(observe=lambda k, detail: heard.append(k))
    feed_all(assembler, script(PIECES[:3]))
    with pytest.raises(ProtocolError) as raised:
        assembler.feed(bad)
    assert heard == [kind]
    assert raised.value.last_sequence == 3


def test_fragments_that_break_the_shape_are_protocol_errors() -> None:
    both = fragment_message(1, 0, "{}", 0, 0, id="c", name="f")
    both.chunk.text = "hi"
    with pytest.raises(ProtocolError, match="both text and a tool-call fragment"):
        StreamAssembler().feed(both)
    with pytest.raises(ProtocolError, match="#1 begins before #0"):
        StreamAssembler().feed(fragment_message(1, 1, "{}", 0, 0, id="c", name="f"))
    renamed = StreamAssembler()
    renamed.feed(fragment_message(1, 0, "{", 0, 0, id="c", name="f"))
    with pytest.raises(ProtocolError, match="name 'g'"):
        renamed.feed(fragment_message(2, 0, "}", 1, 0, name="g"))


def test_verified_calls_must_equal_their_fragments() -> None:
    assembler = StreamAssembler()
    feed_all(assembler, script(PIECES))
    calls = final_calls(PIECES)
    calls[0].arguments = '{"city": "Lyon"}'
    with pytest.raises(IntegrityError, match="tool call #0"):
        assembler.feed(completed(PIECES, tool_calls=calls))

    unstreamed = StreamAssembler()
    feed_all(unstreamed, script(["hi"]))
    with pytest.raises(IntegrityError, match="never streamed"):
        unstreamed.feed(completed(["hi"], tool_calls=[pb.ToolCall(id="c", name="f")]))


def test_completed_without_its_calls_keeps_the_verified_fragments() -> None:
    assembler = StreamAssembler()
    feed_all(assembler, script(PIECES))
    result = assembler.feed(completed(PIECES, tool_calls=[]))[-1].result
    assert [c.arguments for c in result.tool_calls] == [c.arguments for c in final_calls(PIECES)]
    assert all(c.complete for c in result.tool_calls)


def test_a_retraction_drops_fragments_from_its_sequence_and_completed_calls_replace_them() -> None:
    assembler = StreamAssembler()
    feed_all(assembler, script(PIECES))
    # Governance rewrote call #0's city from chunk 5 on; the text is unchanged.
    final = final_calls(PIECES)
    final[0].arguments = '{"city": "[CITY]", "unit": "°C"}'
    events = assembler.feed(completed(PIECES, tool_calls=final, retract_from=5))
    retraction = events[0]
    assert isinstance(retraction, Retraction)
    assert retraction.from_sequence == 5 and retraction.kept_text == "Let me check. "
    assert retraction.kept_tool_calls == (
        ToolCall(0, "call_0", "get_weather", '{"city": '),
        ToolCall(1, "call_1", "get_time", '{"tz": "CET"}'),
    )
    result = events[-1].result
    assert result.retraction == retraction and result.verified
    assert [c.arguments for c in result.tool_calls] == [final[0].arguments, '{"tz": "CET"}']
    assert retraction.final_tool_calls == result.tool_calls
    assert all(c.complete for c in assembler.tool_calls)


def test_kept_fragments_must_be_a_prefix_of_the_final_call() -> None:
    assembler = StreamAssembler()
    feed_all(assembler, script(PIECES))
    final = final_calls(PIECES)
    final[0].arguments = '{"town": "Paris"}'
    with pytest.raises(IntegrityError, match="not a prefix"):
        assembler.feed(completed(PIECES, tool_calls=final, retract_from=5))


def test_a_retraction_before_a_call_began_drops_it_whole() -> None:
    assembler = StreamAssembler()
    feed_all(assembler, script(PIECES))
    events = assembler.feed(completed(PIECES, text="No.", tool_calls=[], retract_from=1))
    assert events[0].kept_tool_calls == () and events[-1].result.tool_calls == ()


def test_resumed_by_hand_inside_a_call() -> None:
    # The caller holds chunks 1..4 (call #0's first fragment among them).
    assembler = StreamAssembler(resumed_after=4)
    events = feed_all(assembler, script(PIECES)[4:])
    fragments = [e for e in events if isinstance(e, ToolCallFragment)]
    assert [(f.index, f.arguments_offset, f.first) for f in fragments] == [
        (0, 9, False),
        (0, 18, False),
    ]
    assert assembler.tool_calls == [ToolCall(0, "", "", '"Paris", "unit": "°C"}')]
    result = assembler.feed(completed(PIECES))[-1].result
    assert result.resumed_after == 4
    assert result.tool_calls[0] == ToolCall(
        0, "call_0", "get_weather", '{"city": "Paris", "unit": "°C"}', complete=True
    )


# ------------------------------------------------------------------ the client


def test_a_resumed_stream_continues_inside_a_call(fake: FakeServer) -> None:
    messages = script(PIECES)

    def dropped_inside_call_0(
        request: pb.StreamRespondRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamRespondResponse]:
        if request.HasField("resume"):
            yield from messages[request.resume.after_sequence :]
            yield completed(PIECES)
            return
        yield from messages[:5]
        fail(context, grpc.StatusCode.UNAVAILABLE, "connection reset")

    fake.script = dropped_inside_call_0
    with Client(fake.address) as client:
        stream = client.stream("weather?", resumable=True)
        result = stream.collect()
    assert stream.resumes == 1
    assert stream.text == result.text and stream.tool_calls == list(result.tool_calls)
    assert fake.servicer.requests[1].resume.after_sequence == 5
    assert result.verified and result.text == "Let me check. Done."
    assert [c.arguments for c in result.tool_calls] == [
        '{"city": "Paris", "unit": "°C"}',
        '{"tz": "CET"}',
    ]


def test_a_replay_that_repeats_a_fragment_is_refused(fake: FakeServer) -> None:
    messages = script(PIECES)

    def replays_one_too_many(
        request: pb.StreamRespondRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamRespondResponse]:
        if request.HasField("resume"):
            yield from messages[request.resume.after_sequence - 1 :]
            return
        yield from messages[:5]
        fail(context, grpc.StatusCode.UNAVAILABLE, "connection reset")

    fake.script = replays_one_too_many
    with Client(fake.address) as client:
        with pytest.raises(ProtocolError):
            client.stream("weather?", resumable=True).collect()
        assert client.observed.sequence_repeats == 1


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": True,
    },
}
TIME_TOOL = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


def test_requests_take_tools_choices_and_formats_as_plain_dicts(fake: FakeServer) -> None:
    fake.script = lambda request, context: [*script(PIECES), completed(PIECES)]
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 1}}}
    with Client(fake.address) as client:
        client.stream(
            "weather?",
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice="get_weather",
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
        ).collect()
    request = fake.servicer.requests[0]
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert request.tools[0].strict and not request.tools[1].strict
    assert request.tools[0].description == "Current weather"
    assert from_struct(request.tools[0].parameters)["required"] == ["city"]
    assert request.tool_choice.function_name == "get_weather"
    assert request.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert request.response_format.schema_name == "answer" and request.response_format.strict
    assert from_struct(request.response_format.json_schema)["properties"]["answer"] == {
        "type": "integer",
        "minimum": 1,  # a double on the wire; equal as JSON
    }


def test_the_small_helpers() -> None:
    assert tool_choice("required").mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert tool_choice("NONE").mode == pb.TOOL_CHOICE_MODE_NONE
    assert tool_choice({"type": "function", "function": {"name": "f"}}).function_name == "f"
    assert response_format("json_object").type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    bare = schema_document({"type": "object"}, strict=True)
    assert bare.strict and from_struct(bare.json_schema) == {"type": "object"}
    wrapped = schema_document({"name": "n", "schema": {"type": "array"}})
    assert wrapped.schema_name == "n" and from_struct(wrapped.json_schema) == {"type": "array"}
    with pytest.raises(ValueError, match="needs a name"):
        tools([{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(ValueError, match="only function tools"):
        tools([{"type": "code_interpreter", "function": {"name": "x"}}])

    answer = tool_result_message("call_0", {"temperature_c": 21})
    assert answer.role == pb.ROLE_TOOL and answer.tool_call_id == "call_0"
    assert json.loads(answer.content) == {"temperature_c": 21}
    turn = assistant_message(
        "", [ToolCall(0, "call_0", "get_weather", '{"city": "Paris"}', complete=True)]
    )
    assert turn.role == pb.ROLE_ASSISTANT
    assert turn.tool_calls[0] == pb.ToolCall(
        id="call_0", name="get_weather", arguments='{"city": "Paris"}'
    )
    openai = assistant_message(
        tool_calls=[{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]
    )
    assert openai.tool_calls[0].arguments == '{"a": 1}'


# ------------------------------------------------------------------ tokenwire ask


def ask(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = tokenwire_cli.main(["ask", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SCHEMA_CHECKS = [
    pb.VerificationCheck(name="integrity", outcome=pb.CHECK_OUTCOME_PASSED),
    pb.VerificationCheck(
        name="tool_arguments",
        outcome=pb.CHECK_OUTCOME_FAILED,
        violations=[
            pb.CheckViolation(code="SCHEMA_TYPE", message="expected string", json_pointer="/0/city")
        ],
    ),
    pb.VerificationCheck(name="json_schema", outcome=pb.CHECK_OUTCOME_PASSED),
]


def test_ask_shows_calls_as_they_form_and_the_checks(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER_TOOL, TIME_TOOL]))
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"type": "object"}))
    fake.script = lambda request, context: [
        *script(PIECES),
        completed(PIECES, checks=SCHEMA_CHECKS),
    ]
    code, out, err = ask(
        capsys,
        "--target", fake.address,
        "--tools", str(tools_file),
        "--tool-choice", "required",
        "--json-schema", str(schema_file),
        "--strict",
        "weather in Paris?",
    )  # fmt: skip
    assert code == 0, err
    assert out == (
        "Let me check. \n"
        "→ tool call #0 get_weather(\n"
        '{"city": \n'
        ")\n"
        "→ tool call #1 get_time(\n"
        '{"tz": "CET"}\n'
        ")\n"
        "→ tool call #0 get_weather( (continued)\n"
        '"Paris", "unit": "°C"}\n'
        ")\n"
        "Done.\n"
    )
    request = fake.servicer.requests[0]
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert all(t.strict for t in request.tools)  # --strict where the file does not say
    assert request.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert request.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert request.response_format.strict
    lines = err.splitlines()
    assert "· tool_calls · allowed ·" in lines[0]
    assert lines[1:] == [
        "  check tool_arguments: failed",
        "    SCHEMA_TYPE at /0/city: expected string",
        "  check json_schema: passed",
    ]


def test_ask_json_object_and_unary_calls(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps({"tools": [TIME_TOOL]}))
    calls = [pb.ToolCall(id="call_9", name="get_time", arguments='{"tz": "UTC"}')]

    def unary(request: pb.RespondRequest) -> pb.RespondResponse:
        return pb.RespondResponse(completed=completed(["{}"], tool_calls=calls).completed)

    fake.servicer.unary = unary
    code, out, err = ask(
        capsys, "--target", fake.address, "--unary", "--tools", str(tools_file),
        "--json-object", "now?",
    )  # fmt: skip
    assert code == 0, err
    assert out == '{}\n→ tool call #0 get_time(\n{"tz": "UTC"}\n)\n\n'
    request = fake.servicer.unary_requests[0]
    assert request.tools[0].name == "get_time"
    assert request.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT


def test_ask_shows_a_retracted_call_and_its_replacement(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    final = final_calls(PIECES)
    final[0].arguments = '{"city": "[CITY]", "unit": "°C"}'
    fake.script = lambda request, context: [
        *script(PIECES),
        completed(PIECES, tool_calls=final, retract_from=5),
    ]
    code, out, err = ask(capsys, "--target", fake.address, "weather?")
    assert code == 0, err
    assert out.endswith(
        "[retracted from chunk 5; final text:]\nLet me check. Done.\n[final tool calls:]\n"
        '→ tool call #0 get_weather(\n{"city": "[CITY]", "unit": "°C"}\n)\n'
        '→ tool call #1 get_time(\n{"tz": "CET"}\n)\n\n'
    )
    assert "retracted from chunk 5" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("not json", "not JSON"),
        ('{"name": "f"}', "expected a JSON list of tools"),
        ('[{"description": "nameless"}]', "needs a name"),
    ],
)
def test_ask_refuses_a_bad_tools_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    code, _, err = ask(capsys, "--tools", str(path), "q")
    assert code == 2
    assert err.startswith("tokenwire ask: --tools ") and message in err
