"""The embedded simulator: the default backend, so tokenwire runs with no model server.

Two models:

* ``tokenwire-sim`` writes plausible English split into word-piece tokens the
  way BPE tokenizers split it (leading spaces, long words in pieces, some
  multi-byte UTF-8). The same seed, prompt and parameters always give the same
  answer; without a seed the prompt itself seeds the generator.
* ``echo`` streams the last user message back in tokens of a fixed number of
  characters, so tests and operators can put exact text through the pipeline.

Timing and faults are configurable per server and per request through labels
(``tokenwire.sim/<knob>``), so callers in any language can exercise slow
generations, stalls and failures without a test double.

Tool calls and structured output, for tests and demos:

* ``tokenwire.sim/tool-calls`` scripts the calls exactly (a JSON array of
  ``{"name", "arguments", "id"?}``; the arguments are sent as given, invalid
  JSON included, so a caller can test its checks). Each call's arguments go
  out in fragments of ~4 characters, one per token step: timing and fault
  knobs count them as tokens.
* Without it, ``tokenwire-sim`` calls a tool when it must (tool_choice
  REQUIRED, or a named function), with arguments made from the tool's JSON
  Schema, and answers a JSON response format with a document made from the
  schema. ``echo`` stays an exact echo.

Why one module: the two simulated models, their knobs and their faults are
one backend; the knobs table (KNOBS) is the single description both
validation and the docs read.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tokenwire_server.backends.base import Backend, BackendItem
from tokenwire_server.config import SimulatorConfig
from tokenwire_server.domain import (
    Finish,
    FinishReason,
    GenerationRequest,
    ResponseFormatType,
    Role,
    ToolCallFragment,
    ToolChoiceMode,
    ToolSpec,
)
from tokenwire_server.errors import BackendUnavailable, FieldViolation, InvalidRequest
from tokenwire_server.tokens import estimate_prompt_tokens

SIM_MODEL = "tokenwire-sim"
ECHO_MODEL = "echo"
MODEL_VERSION = "sim-2026.11"
KNOB_PREFIX = "tokenwire.sim/"

_WORDS = [
    "the",
    "stream",
    "of",
    "tokens",
    "arrives",
    "in",
    "order",
    "and",
    "every",
    "chunk",
    "carries",
    "its",
    "sequence",
    "number",
    "governance",
    "checks",
    "each",
    "window",
    "before",
    "release",
    "so",
    "nothing",
    "sensitive",
    "leaves",
    "the",
    "gateway",
    "a",
    "verification",
    "gate",
    "compares",
    "the",
    "digest",
    "of",
    "streamed",
    "text",
    "with",
    "the",
    "final",
    "payload",
    "latency",
    "matters",
    "because",
    "users",
    "watch",
    "partial",
    "answers",
    "appear",
    "while",
    "generation",
    "continues",
    "backpressure",
    "keeps",
    "memory",
    "bounded",
    "when",
    "a",
    "reader",
    "falls",
    "behind",
    "the",
    "model",
    "operators",
    "trace",
    "requests",
    "across",
    "services",
    "and",
    "correlate",
    "logs",
    "with",
    "metrics",
    "resumable",
    "responses",
    "survive",
    "dropped",
    "connections",
    "and",
    "replica",
    "restarts",
    "production",
    "teams",
    "prefer",
    "contracts",
    "that",
    "hold",
    "under",
    "faults",
    "and",
    "deadlines",
    "café",
    "naïve",
    "résumé",
    "façade",
    "über",
    "coöperate",
    "jalapeño",
    "smörgåsbord",
    "deterministic",
    "simulation",
    "makes",
    "integration",
    "tests",
    "reproducible",
    "and",
    "fast",
    "interoperability",
    "across",
    "languages",
    "depends",
    "on",
    "stable",
    "field",
    "names",
    "and",
    "semantics",
]
_PUNCTUATION = (".", ".", ".", ",", ",", ";", ":", "!", "?", " —")


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    """One call of the `tool-calls` knob; `arguments` is sent exactly as given."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True, slots=True)
class _Knobs:
    answer_tokens: int
    time_to_first_token: float
    inter_token_delay: float
    echo_token_chars: int
    fail_after: int | None
    stall_after: int | None
    raise_after: int | None
    #: Set only when the request asked for answer tokens itself.
    answer_tokens_set: bool = False
    tool_calls: tuple[ScriptedCall, ...] | None = None


@dataclass(frozen=True, slots=True)
class Knob:
    """How one knob's value is read: a number (`integer` or `number`) inside
    [low, high], or `tool-calls`, a JSON array of scripted calls."""

    kind: Literal["integer", "number", "tool-calls"]
    low: float = 0
    high: float = 0

    @property
    def numeric(self) -> bool:
        return self.kind != "tool-calls"

    @property
    def integer(self) -> bool:
        return self.kind == "integer"


#: Every knob a request can set: numbers are finite and inside their bounds,
#: anything else is INVALID_ARGUMENT naming the label. Validation and
#: docs/request-bounds.md (checked by tests/test_request_bounds.py) read this
#: one table, so a new knob cannot go unchecked or undocumented.
KNOBS: dict[str, Knob] = {
    "answer-tokens": Knob("integer", 0, 1_000_000),
    "ttft-ms": Knob("number", 0, 600_000),
    "inter-token-ms": Knob("number", 0, 60_000),
    "echo-token-chars": Knob("integer", 1, 4096),
    "fail-after": Knob("integer", 0, 1_000_000),
    "stall-after": Knob("integer", 0, 1_000_000),
    "raise-after": Knob("integer", 0, 1_000_000),
    "tool-calls": Knob("tool-calls"),
}

#: What the `tool-calls` knob must look like, for its refusal message.
TOOL_CALLS_FORMAT = 'a JSON array of {"name": string, "arguments": string, "id"?: string}'
#: Characters of arguments per fragment: about a BPE token of JSON.
TOOL_FRAGMENT_CHARS = 4

#: The spellings every caller's language writes and reads alike. Python's own
#: int() and float() also accept "1_000", " 5 ", Unicode digits ("٣") and
#: "infinity"; a label a Go or TypeScript test sets must mean the same here,
#: so only plain ASCII decimal notation is a number.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _present(labels: Mapping[str, str]) -> list[str]:
    return [k[len(KNOB_PREFIX) :] for k in labels if k.startswith(KNOB_PREFIX)]


def _parse_knob(knob: str, raw: str) -> float | tuple[ScriptedCall, ...] | FieldViolation:
    field = f"labels[{KNOB_PREFIX}{knob}]"
    spec = KNOBS.get(knob)
    if spec is None:
        return FieldViolation(field, f"unknown simulator knob; known: {', '.join(sorted(KNOBS))}")
    if not spec.numeric:
        return _parse_tool_calls(field, raw)
    integer, low, high = spec.integer, spec.low, spec.high
    refusal = FieldViolation(
        field, f"must be {'an integer' if integer else 'a number'} from {low:g} to {high:g}"
    )
    # No value in range needs more characters; int() need not read a 1,000-digit one.
    if len(raw) > 32 or not (_INTEGER if integer else _NUMBER).fullmatch(raw):
        return refusal
    value: float = int(raw) if integer else float(raw)  # float("1e400") is inf
    if not (math.isfinite(value) and low <= value <= high):
        return refusal
    return value


def _parse_tool_calls(field: str, raw: str) -> tuple[ScriptedCall, ...] | FieldViolation:
    """The `tool-calls` knob: at least one call, each a non-empty name, its
    arguments as a string (any text: invalid JSON is a test's business), and
    optionally a non-empty id. Unknown keys are refused like unknown knobs,
    so a typo ("args") never passes as a call without arguments."""
    try:
        value = json.loads(raw)
    except ValueError as error:
        return FieldViolation(field, f"must be {TOOL_CALLS_FORMAT}: not JSON ({error})")
    if not isinstance(value, list) or not value:
        return FieldViolation(field, f"must be {TOOL_CALLS_FORMAT}, with at least one call")
    calls: list[ScriptedCall] = []
    for position, item in enumerate(value):
        where = f"must be {TOOL_CALLS_FORMAT}: call {position}"
        if not isinstance(item, dict):
            return FieldViolation(field, f"{where} is not an object")
        unknown = sorted(set(item) - {"name", "arguments", "id"})
        if unknown:
            return FieldViolation(field, f"{where} has unknown keys {unknown}")
        name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("id", "")
        if not isinstance(name, str) or not name:
            return FieldViolation(field, f"{where} needs a non-empty string name")
        if not isinstance(arguments, str):
            return FieldViolation(field, f"{where} needs arguments as a string of JSON text")
        if not isinstance(call_id, str) or ("id" in item and not call_id):
            return FieldViolation(field, f"{where} has an id that is not a non-empty string")
        calls.append(ScriptedCall(name=name, arguments=arguments, id=call_id))
    return tuple(calls)


def knob_violations(labels: Mapping[str, str]) -> list[FieldViolation]:
    """What is wrong with the simulator knobs among `labels`, before generation."""
    found = [_parse_knob(knob, labels[KNOB_PREFIX + knob]) for knob in _present(labels)]
    return [f for f in found if isinstance(f, FieldViolation)]


def _knob_error(problems: list[FieldViolation]) -> InvalidRequest:
    return InvalidRequest(
        f"invalid simulator knob: {problems[0].field}: {problems[0].description}",
        reason="INVALID_SIMULATOR_KNOB",
        violations=problems,
    )


@dataclass(slots=True)
class SimulatorStats:
    """Counters tests read to prove what happened inside the backend."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    tokens_emitted: int = 0


def _word_pieces(word: str) -> list[str]:
    if len(word) <= 6:
        return [word]
    cut = 4 if len(word) < 10 else 5
    return [word[:cut], *_word_pieces(word[cut:])]


#: Answers up to this many tokens are cached (8 of them: a few MiB at most).
_CACHED_ANSWER_TOKENS = 100_000


@functools.lru_cache(maxsize=8)
def _composed(seed: int | str, n_tokens: int) -> tuple[str, ...]:
    """The answer for a seed, composed once: callers that repeat a prompt (load
    tests, retries) get it without paying ~2 µs per token for the composing."""
    return tuple(_compose(random.Random(seed), n_tokens))


def _compose(rng: random.Random, n_tokens: int) -> list[str]:
    tokens: list[str] = []
    sentence_start = True
    words_in_sentence = 0
    target = rng.randint(6, 16)
    while len(tokens) < n_tokens:
        word = rng.choice(_WORDS)
        if sentence_start:
            word = word[0].upper() + word[1:]
        pieces = _word_pieces(word)
        tokens.append(("" if not tokens else " ") + pieces[0])
        tokens.extend(pieces[1:])
        sentence_start = False
        words_in_sentence += 1
        if words_in_sentence >= target:
            tokens.append(rng.choice(_PUNCTUATION))
            terminal = tokens[-1] in (".", "!", "?")
            sentence_start = terminal
            words_in_sentence = 0
            target = rng.randint(6, 16)
            if terminal and rng.random() < 0.15:
                tokens.append("\n\n")
    return tokens[:n_tokens]


def _split_fixed(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _apply_stop(tokens: list[str], stop: tuple[str, ...]) -> list[str] | None:
    """Cuts the tokens before the earliest stop string; None when none occurs."""
    text = "".join(tokens)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return None
    cut = min(hits)
    kept: list[str] = []
    length = 0
    for token in tokens:
        if length + len(token) <= cut:
            kept.append(token)
            length += len(token)
            continue
        if cut > length:
            kept.append(token[: cut - length])
        break
    return kept


#: Most tokens handed on at once when several are already due.
_BURST = 64


class SimulatorBackend(Backend):
    """Deterministic token source with timing and fault knobs."""

    name = "simulator"
    provider = "tokenwire.simulator"
    deterministic = True

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self.stats = SimulatorStats()
        #: Set whenever a generation is cancelled; tests await it instead of sleeping.
        self.cancelled = asyncio.Event()
        self._ticker: _Ticker | None = None

    def models(self) -> Mapping[str, str]:
        return {SIM_MODEL: MODEL_VERSION, ECHO_MODEL: MODEL_VERSION}

    def check_labels(self, labels: Mapping[str, str]) -> list[FieldViolation]:
        """The knobs' values, scripted tool calls included, before generation."""
        return knob_violations(labels)

    def _knobs(self, labels: Mapping[str, str]) -> _Knobs:
        c = self._config
        values = {knob: _parse_knob(knob, labels[KNOB_PREFIX + knob]) for knob in _present(labels)}
        problems = [v for v in values.values() if isinstance(v, FieldViolation)]
        if problems:
            raise _knob_error(problems)

        def number(knob: str) -> float | None:
            value = values.get(knob)
            return value if isinstance(value, (int, float)) else None

        scripted = values.get("tool-calls")

        def ms(knob: str, default: float) -> float:
            value = number(knob)
            return default if value is None else value / 1000.0

        def count(knob: str, default: int | None) -> int | None:
            value = number(knob)
            return default if value is None else int(value)

        return _Knobs(
            answer_tokens=count("answer-tokens", c.sim_answer_tokens) or 0,
            time_to_first_token=ms("ttft-ms", c.sim_time_to_first_token),
            inter_token_delay=ms("inter-token-ms", c.sim_inter_token_delay),
            echo_token_chars=count("echo-token-chars", c.sim_echo_token_chars) or 1,
            fail_after=count("fail-after", None),
            stall_after=count("stall-after", None),
            raise_after=count("raise-after", None),
            answer_tokens_set="answer-tokens" in values,
            tool_calls=scripted if isinstance(scripted, tuple) else None,
        )

    def _plan(
        self, request: GenerationRequest, knobs: _Knobs
    ) -> tuple[list[str], list[ToolCallFragment]]:
        """The answer's text tokens and, after them, its tool-call fragments."""
        if request.model == ECHO_MODEL:
            last_user = next(
                (m.content for m in reversed(request.messages) if m.role == Role.USER), ""
            )
            text = _split_fixed(last_user, knobs.echo_token_chars)
            return text, _fragments(knobs.tool_calls or (), _seed(request))
        seed = _seed(request)
        if knobs.tool_calls is not None:
            # Scripted calls: text only when the request asked for answer tokens.
            text = self._compose(
                request, seed, knobs.answer_tokens if knobs.answer_tokens_set else 0
            )
            return text, _fragments(knobs.tool_calls, seed)
        tool = _forced_tool(request)
        if tool is not None:
            arguments = json.dumps(
                example_for(tool.parameters or {"type": "object"}), ensure_ascii=False
            )
            return [], _fragments((ScriptedCall(tool.name, arguments),), seed)
        response_format = request.response_format
        if response_format is not None and response_format.is_json:
            schema = response_format.schema
            if response_format.type is ResponseFormatType.JSON_OBJECT or schema is None:
                document: object = {"answer": "example"}
            else:
                document = example_for(schema)
            encoded = json.dumps(document, ensure_ascii=False)
            return _split_fixed(encoded, TOOL_FRAGMENT_CHARS), []
        return self._compose(request, seed, knobs.answer_tokens), []

    def _compose(
        self, request: GenerationRequest, seed: int | str, answer_tokens: int
    ) -> list[str]:
        # Tokens past max_tokens are never sent: composing them would let a label
        # (answer-tokens=10**9) cost unbounded time and memory.
        count = min(answer_tokens, request.max_tokens + 1)
        if count > _CACHED_ANSWER_TOKENS:
            return _compose(random.Random(seed), count)
        return list(_composed(seed, count))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[BackendItem]:
        knobs = self._knobs(request.labels)
        tokens, calls = self._plan(request, knobs)
        reason = FinishReason.TOOL_CALLS if calls else FinishReason.STOP
        if len(tokens) > request.max_tokens:
            tokens, calls = tokens[: request.max_tokens], []
            reason = FinishReason.LENGTH
        elif len(tokens) + len(calls) > request.max_tokens:
            # A call cut off mid-arguments, as a real model's is at max_tokens.
            calls = calls[: request.max_tokens - len(tokens)]
            reason = FinishReason.LENGTH
        if request.stop:
            cut = _apply_stop(tokens, request.stop)
            if cut is not None:
                tokens, calls, reason = cut, [], FinishReason.STOP_SEQUENCE
        prompt_tokens = estimate_prompt_tokens(request.messages)
        stats = self.stats
        stats.started += 1
        ticker = self._ticker_for_loop()
        loop = ticker.loop
        # Token i is due at start + ttft + i * delay, however late the loop ran the
        # previous one: sleeping `delay` after each token instead would add every
        # wake-up's lateness to all later tokens (about 1 ms per token on an idle
        # loop, seconds over a long answer on a busy one). A token already due goes
        # out at once, so a stream that fell behind catches up in one burst.
        first_due = loop.time() + knobs.time_to_first_token
        delay = knobs.inter_token_delay
        faults = {knobs.fail_after, knobs.raise_after, knobs.stall_after}
        # Tokens already due go out together, as an upstream's network read
        # would bring them: one hand-off per burst instead of one per token.
        burst: list[str] = []
        now = loop.time()
        try:
            for index, token in enumerate(tokens):
                due = first_due + index * delay
                if due > now:  # only then can the clock matter: time never runs back
                    now = loop.time()
                if burst and (len(burst) >= _BURST or index in faults or due > now):
                    stats.tokens_emitted += len(burst)
                    yield burst[0] if len(burst) == 1 else burst
                    burst = []
                if index in faults:
                    await _fault(index, knobs, loop)
                if due > now:
                    await ticker.wait_until(due)
                    now = loop.time()
                burst.append(token)
            if burst:
                stats.tokens_emitted += len(burst)
                yield burst[0] if len(burst) == 1 else burst
            # Tool-call fragments after the text, on the same schedule: each is a
            # token step (rare enough that one hand-off each costs nothing).
            for index, fragment in enumerate(calls, start=len(tokens)):
                if index in faults:
                    await _fault(index, knobs, loop)
                due = first_due + index * delay
                if due > loop.time():
                    await ticker.wait_until(due)
                stats.tokens_emitted += 1
                yield fragment
        except asyncio.CancelledError:
            stats.cancelled += 1
            self.cancelled.set()
            raise
        stats.finished += 1
        yield Finish(
            reason=reason, prompt_tokens=prompt_tokens, completion_tokens=len(tokens) + len(calls)
        )

    def _ticker_for_loop(self) -> _Ticker:
        loop = asyncio.get_running_loop()
        ticker = self._ticker
        if ticker is None or ticker.loop is not loop:
            ticker = self._ticker = _Ticker(loop)
        return ticker


async def _fault(index: int, knobs: _Knobs, loop: asyncio.AbstractEventLoop) -> None:
    """The fault a knob put at token `index`: a failure, a crash or a stall."""
    if index == knobs.fail_after:
        raise BackendUnavailable(
            f"simulated backend failure after {index} tokens", reason="BACKEND_FAILED"
        )
    if index == knobs.raise_after:
        raise RuntimeError(f"simulated crash after {index} tokens")
    if index == knobs.stall_after:
        await loop.create_future()


def _seed(request: GenerationRequest) -> int | str:
    """The request's seed, else a digest of its prompt: same request, same output."""
    if request.seed is not None:
        return request.seed
    prompt = "\x1e".join(f"{m.role}:{m.content}" for m in request.messages)
    return hashlib.sha256(prompt.encode()).hexdigest()


def _fragments(calls: tuple[ScriptedCall, ...], seed: int | str) -> list[ToolCallFragment]:
    """Each call's arguments in ~4-character fragments, id and name on the
    first. A call without a scripted id gets "call_" and 24 hex digits derived
    from the seed, the call's position and name: deterministic, so another
    replica regenerating the response makes the same ids."""
    fragments: list[ToolCallFragment] = []
    for index, call in enumerate(calls):
        call_id = (
            call.id
            or "call_"
            + hashlib.sha256(f"{seed}\x1e{index}\x1e{call.name}".encode()).hexdigest()[:24]
        )
        pieces = _split_fixed(call.arguments, TOOL_FRAGMENT_CHARS) or [""]
        fragments.append(ToolCallFragment(index, pieces[0], call_id, call.name))
        fragments.extend(ToolCallFragment(index, piece) for piece in pieces[1:])
    return fragments


def _forced_tool(request: GenerationRequest) -> ToolSpec | None:
    """The tool the request makes the model call: the named one, or with
    REQUIRED the first; None when the model may answer in text."""
    choice = request.tool_choice
    if not request.tools or choice is None:
        return None
    if choice.function_name:
        return next((t for t in request.tools if t.name == choice.function_name), request.tools[0])
    if choice.mode is ToolChoiceMode.REQUIRED:
        return request.tools[0]
    return None


_FORMAT_EXAMPLES = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "hostname": "example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}
#: Deeper schemas (or $ref cycles) end in null rather than recursing on.
_MAX_SCHEMA_DEPTH = 32


def example_for(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A deterministic JSON value that satisfies `schema` for the common
    keywords: `const`, the first `enum` value, the first branch of
    `anyOf`/`oneOf`, `allOf` merged, local `$ref`s, every required property,
    `minItems` items (at least one), string lengths and formats, numeric
    bounds and `multipleOf`. `pattern`, `not` and `uniqueItems` over several
    items are not attempted: a demo schema rarely needs them, and the
    pipeline's schema check reports whatever this gets wrong."""
    root = schema if root is None else root
    if depth > _MAX_SCHEMA_DEPTH or not isinstance(schema, Mapping):
        return None if depth > _MAX_SCHEMA_DEPTH else {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        return example_for(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return example_for(branches[0], root, depth + 1)
    branches = schema.get("allOf")
    if isinstance(branches, list) and branches:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for branch in branches:
            if isinstance(branch, Mapping):
                for key, value in branch.items():
                    if key == "properties" and isinstance(value, Mapping):
                        merged["properties"] = {**merged.get("properties", {}), **value}
                    elif key == "required" and isinstance(value, list):
                        merged["required"] = [*merged.get("required", []), *value]
                    else:
                        merged.setdefault(key, value)
        return example_for(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if kind == "object":
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        return {
            name: example_for(properties.get(name, {}), root, depth + 1)
            for name in required
            if isinstance(name, str)
        }
    if kind == "array":
        prefix = schema.get("prefixItems")
        items = (
            [example_for(s, root, depth + 1) for s in prefix] if isinstance(prefix, list) else []
        )
        wanted = max(int(schema.get("minItems", 0)), 1)
        if "maxItems" in schema:
            wanted = min(wanted, int(schema["maxItems"]))
        item_schema = schema.get("items")
        while len(items) < wanted and item_schema is not False:
            items.append(
                example_for(
                    item_schema if isinstance(item_schema, Mapping) else {}, root, depth + 1
                )
            )
        return items
    if kind == "string":
        text = _FORMAT_EXAMPLES.get(str(schema.get("format")), "example")
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        text = text.ljust(low, "x")
        return text[: int(high)] if high is not None else text
    if kind in ("integer", "number"):
        return _number_for(schema)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return {}


def _number_for(schema: Mapping[str, Any]) -> int | float:
    """The number nearest 0 inside the bounds (a multiple of `multipleOf`);
    between exclusive bounds closer than 1 apart, their midpoint."""
    low, high = schema.get("minimum"), schema.get("maximum")
    exclusive_low, exclusive_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if exclusive_low is not None:
        low = exclusive_low + 1 if low is None else max(low, exclusive_low + 1)
    if exclusive_high is not None:
        high = exclusive_high - 1 if high is None else min(high, exclusive_high - 1)
    value: float = 0
    if low is not None and value < low:
        value = math.ceil(low)
    elif high is not None and value > high:
        value = math.floor(high)
    step = schema.get("multipleOf")
    if isinstance(step, (int, float)) and step > 0:
        value = math.ceil(value / step) * step
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (schema.get("minimum"), exclusive_low, schema.get("maximum"), exclusive_high)
        edges = [b for b in bounds if b is not None]
        value = (min(edges) + max(edges)) / 2
    return int(value) if float(value).is_integer() else value


class _Ticker:
    """One timer per millisecond slot, shared by every generation on the loop.

    A paced generation waits once per token; with one `asyncio.sleep` each,
    2,000 streams at 20 tokens/s are 40,000 timer handles a second pushed on
    and popped off the loop's heap. Waits that fall due in the same slot share
    one timer instead; a wait ends at the end of its slot (never early, at most
    `resolution` late, about what epoll's millisecond timeout costs anyway).
    """

    __slots__ = ("_resolution", "_slots", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.001) -> None:
        self.loop = loop
        self._resolution = resolution
        self._slots: dict[int, list[asyncio.Future[None]]] = {}

    def wait_until(self, when: float) -> asyncio.Future[None]:
        """A future resolved once loop time `when` has passed."""
        slot = math.ceil(when / self._resolution)
        waiter: asyncio.Future[None] = self.loop.create_future()
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = []
            self.loop.call_at(slot * self._resolution, self._fire, slot)
        waiters.append(waiter)
        return waiter

    def _fire(self, slot: int) -> None:
        for waiter in self._slots.pop(slot):
            if not waiter.done():  # a cancelled generation leaves its waiter cancelled
                waiter.set_result(None)
