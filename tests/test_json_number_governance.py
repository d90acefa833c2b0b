"""A card written as a JSON number in any form (exponent, fraction, `.0`,
negative, `E+`) is governed by its value, not only by its text as written:
through the real server, in a JSON `response_format` (echo model, every
token size 1..8) and in tool-call arguments (the simulator's scripted calls
and an OpenAI-compatible upstream cutting them every 1..8 characters). The
number becomes a string holding the replacement, the output stays JSON and is
the same whatever the cuts; a value that is no integer, or one with more
digits than any rule matches (`1e999999`), stays as written, and the policy
never sees it expanded."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import StartServer, chunks_of, collect, completed_of, stream_request
from tests.test_openai_upstream import route, sse
from tests.test_tool_calls import assembled, call_events, request, struct
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import Action
from tokenwire_server.governance.policy import FinalDecision, GovernanceSession, Policy
from tokenwire_server.governance.policy_file import load_policy

CARD = "[PAYMENT_CARD]"

#: 4111111111111111 (a Luhn-valid test card), written as JSON numbers.
CARD_FORMS = {
    "exponent": ("4.111111111111111e15", CARD),
    "fraction-and-exponent": ("41111111111111.11e2", CARD),
    "upper-E-plus": ("4.111111111111111E+15", CARD),
    "leading-zero-exponent": ("0.4111111111111111e016", CARD),
    "negative-exponent": ("411111111111111100e-2", CARD),
    "trailing-zero-fraction": ("4111111111111111.0", CARD),
    "integer-exponent": ("4111111111111111e0", CARD),
    "negative": ("-4.111111111111111e15", "-" + CARD),
}

TOKEN_SIZES = range(1, 9)


async def structured(
    running: Any, text: str, token_chars: int, *, unary: bool = False
) -> tuple[pb.Completed, str]:
    """The echo model answering `text` as a JSON object in `token_chars`-character
    tokens: the Completed and the text its chunks carried."""
    fields: dict[str, Any] = {
        "model": "echo",
        "labels": {"tokenwire.sim/echo-token-chars": str(token_chars)},
        "response_format": pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    }
    if unary:
        reply = await running.stub.Respond(
            pb.RespondRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)], **fields)
        )
        return reply.completed, reply.completed.final_text
    got = await collect(
        running.stub.StreamRespond(
            stream_request(text, chunking=pb.Chunking(max_tokens_per_chunk=1), **fields)
        )
    )
    return completed_of(got), "".join(c.text for c in chunks_of(got))


def spans(completed: pb.Completed) -> list[tuple[str, str]]:
    raw = completed.final_text.encode()
    return [(a.entity_type, raw[a.start : a.end].decode()) for a in completed.actions]


@pytest.mark.parametrize(("written", "expected"), CARD_FORMS.values(), ids=CARD_FORMS.keys())
async def test_a_card_written_as_a_json_number_in_any_form_is_redacted_in_structured_output(
    start_server: StartServer, written: str, expected: str
) -> None:
    running = await start_server(policy="builtin:default")
    text = '{"card": ' + written + ', "n": 2}'
    finals = set()
    for size in TOKEN_SIZES:
        completed, streamed = await structured(running, text, size)
        assert json.loads(completed.final_text) == {"card": expected, "n": 2}, size
        assert streamed == completed.final_text
        assert completed.verdict == pb.VERDICT_REDACTED
        assert spans(completed) == [("PAYMENT_CARD", CARD)]
        finals.add(completed.final_text)
    assert finals == {'{"card": "' + expected + '", "n": 2}'}
    unary, _ = await structured(running, text, 3, unary=True)
    assert unary.final_text in finals


async def test_every_form_in_one_document_gives_one_output_whatever_the_token_size(
    start_server: StartServer,
) -> None:
    running = await start_server(policy="builtin:default")
    forms = [written for written, _ in CARD_FORMS.values()]
    text = '{"cards": [' + ", ".join(forms) + '], "nested": {"k": [4.111111111111111e+15]}}'
    finals = {(await structured(running, text, size))[0].final_text for size in TOKEN_SIZES}
    (final,) = finals
    assert json.loads(final) == {
        "cards": [expected for _, expected in CARD_FORMS.values()],
        "nested": {"k": [CARD]},
    }
    assert "4111" not in final and "e15" not in final.lower()


class Recording(Policy):
    """The default policy, noting the longest text any of its sessions is given."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.policy_id = inner.policy_id
        self.policy_version = inner.policy_version
        self.longest = 0

    def open_session(self) -> GovernanceSession:
        return _Recorded(self, self.inner.open_session())


class _Recorded(GovernanceSession):
    def __init__(self, owner: Recording, inner: GovernanceSession) -> None:
        self.owner, self.inner = owner, inner

    def push(self, text: str) -> tuple[str, tuple[Action, ...]]:
        self.owner.longest = max(self.owner.longest, len(text))
        released = self.inner.push(text)
        self.halted = self.inner.halted
        return released

    def finish(self, complete: bool = False) -> tuple[str, tuple[Action, ...], FinalDecision]:
        return self.inner.finish(complete)


async def test_non_integers_and_huge_exponents_stay_as_written_and_are_never_expanded(
    start_server: StartServer,
) -> None:
    """4.5e-3 is no integer; 1e999999 has a million digits (no card, no phone):
    both keep today's text, and no session is handed their digits."""
    policy = Recording(load_policy("builtin:default"))
    running = await start_server(policy=policy)
    untouched = (
        '"small": 4.5e-3, "half": -2.5, "big": 1e999999, "bigger": -7E+99999, '
        '"tiny": 1e-999999, "zero": 0e999999999, "plain": 2.5e3, "year": 2.024e3'
    )
    text = '{"card": 4.111111111111111e15, ' + untouched + "}"
    began = time.perf_counter()
    finals = {(await structured(running, text, size))[0].final_text for size in TOKEN_SIZES}
    assert time.perf_counter() - began < 10
    assert finals == {'{"card": "' + CARD + '", ' + untouched + "}"}
    assert policy.longest <= 64


def call_script(arguments: str) -> str:
    return json.dumps([{"name": "send_mail", "arguments": arguments}])


ARGUMENTS = (
    '{"card": 4.111111111111111e15, "again": -41111111111111.11e2,'
    ' "exact": 4111111111111111.0, "amount": 4.5e-3, "big": 1e999999, "days": 2}'
)
GOVERNED = {
    "card": CARD,
    "again": "-" + CARD,
    "exact": CARD,
    "amount": 4.5e-3,
    "big": float("inf"),  # as written: json.loads reads 1e999999 as infinity
    "days": 2,
}


async def test_tool_call_arguments_are_governed_by_value_wherever_the_fragments_cut(
    start_server: StartServer,
) -> None:
    """The simulator sends scripted arguments in 4-character fragments; leading
    spaces move every cut, so each number is cut at each of its positions."""
    running = await start_server(policy="builtin:default")
    governed = set()
    for shift in range(8):
        got = await collect(
            running.stub.StreamRespond(
                stream_request(
                    "pay",
                    tools=[pb.Tool(name="send_mail", parameters=struct({"type": "object"}))],
                    labels={"tokenwire.sim/tool-calls": call_script(" " * shift + ARGUMENTS)},
                    chunking=pb.Chunking(max_tokens_per_chunk=1),
                )
            )
        )
        completed = completed_of(got)
        (call,) = completed.tool_calls
        assert json.loads(call.arguments) == GOVERNED, shift
        assert assembled(chunks_of(got))[0][2] == call.arguments
        assert completed.verdict == pb.VERDICT_REDACTED
        assert "1e999999" in call.arguments and "4.5e-3" in call.arguments
        governed.add(call.arguments[shift:])
    assert len(governed) == 1


async def test_tool_call_arguments_from_an_upstream_in_fragments_of_1_to_8_characters(
    start_server: StartServer, upstream: Any
) -> None:
    current: list[str] = []

    async def handler(http: web.Request) -> web.StreamResponse:
        return await sse(http, current)

    up = await upstream(handler)
    running = await start_server(upstreams=(route(up.url),), policy="builtin:default")
    governed = set()
    for pieces in TOKEN_SIZES:
        current[:] = call_events([("call_1", "send_mail", ARGUMENTS)], pieces=pieces)
        got = await collect(running.stub.StreamRespond(request()))
        completed = completed_of(got)
        (call,) = completed.tool_calls
        assert json.loads(call.arguments) == GOVERNED, pieces
        assert assembled(chunks_of(got))[0][2] == call.arguments
        assert completed.verdict == pb.VERDICT_REDACTED
        governed.add(call.arguments)
    assert len(governed) == 1
