"""Request validation: every problem found is named by its field in one BadRequest.

Collecting all violations (instead of stopping at the first) lets a caller fix
a request in one round trip; the ErrorInfo reason names the most specific
problem so clients can branch on it. Every number a request can set has its
range in `request_bounds` (docs/request-bounds.md), and a violation states
that range, so the caller learns the fix from the error alone. Tools, the
tool choice, the response format and tool turns are checked in
structured/request_fields.py; a request without them pays a few attribute
tests for that.

Why one module: every field's check fills the one BadRequest in one pass over
the request, in the order a caller reads the fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.backends.base import Backend
from tokenwire_server.backends.registry import BackendRegistry
from tokenwire_server.config import Config
from tokenwire_server.domain import (
    DeliveryMode,
    DeliveryOptions,
    GenerationRequest,
    Message,
    ModelInfo,
    Role,
)
from tokenwire_server.errors import FieldViolation, InvalidRequest, TokenwireError
from tokenwire_server.structured.request_fields import (
    parse_response_format,
    parse_tool_choice,
    parse_tool_turn,
    parse_tools,
)

MAX_REQUEST_ID_LENGTH = 128
MAX_STOP_SEQUENCES = 4
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024

_ROLES = {int(r): r for r in Role}
_MODES = {
    pb.DELIVERY_MODE_UNSPECIFIED: DeliveryMode.AUTO,
    pb.DELIVERY_MODE_AUTO: DeliveryMode.AUTO,
    pb.DELIVERY_MODE_STREAM: DeliveryMode.STREAM,
    pb.DELIVERY_MODE_BUFFERED: DeliveryMode.BUFFERED,
}


@dataclass(frozen=True, slots=True)
class Range:
    """The numbers a field accepts: finite, from `low` (or above it, when
    `low_open`) up to `high`. Comparisons alone would let NaN through (every
    comparison with NaN is false), hence the explicit finiteness check."""

    low: float
    high: float
    low_open: bool = False
    unit: str = ""

    def admits(self, value: float) -> bool:
        if not math.isfinite(value) or value > self.high:
            return False
        return value > self.low if self.low_open else value >= self.low

    def describe(self) -> str:
        low, high = f"{self.low:g}{self.unit}", f"{self.high:g}{self.unit}"
        if self.low_open:
            return f"must be greater than {low} and at most {high}"
        return f"must be from {low} to {high}"


#: Fixed by the model APIs tokenwire fronts, not by the operator.
TEMPERATURE = Range(0.0, 2.0)
TOP_P = Range(0.0, 1.0, low_open=True)


def request_bounds(config: Config) -> dict[str, Range]:
    """Every number a request can set, with its range on a server with `config`:
    the one table the checks below use (simulator knobs have theirs in
    backends/simulator.py, beside the code that reads them). 0 for
    `max_tokens` and `max_tokens_per_chunk` means the server default."""
    limits, delivery = config.limits, config.delivery
    return {
        "params.max_tokens": Range(0, limits.max_tokens_cap),
        "params.temperature": TEMPERATURE,
        "params.top_p": TOP_P,
        "chunking.max_tokens_per_chunk": Range(0, delivery.max_tokens_per_chunk_limit),
        "chunking.max_delay": Range(0, delivery.max_chunk_delay_limit, unit="s"),
    }


def is_valid_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


@dataclass(frozen=True, slots=True)
class ParsedCall:
    backend: Backend
    model: ModelInfo
    generation: GenerationRequest
    delivery: DeliveryOptions | None


class _Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self.reason = "INVALID_REQUEST"

    def add(self, field: str, description: str, reason: str | None = None) -> None:
        self.items.append(FieldViolation(field, description))
        if reason is not None and self.reason == "INVALID_REQUEST":
            self.reason = reason

    def error(self) -> InvalidRequest:
        return InvalidRequest(
            f"invalid request: {self.items[0].field}: {self.items[0].description}"
            + (f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""),
            reason=self.reason,
            violations=self.items,
        )


def parse_call(
    request: pb.RespondRequest | pb.StreamRespondRequest,
    config: Config,
    registry: BackendRegistry,
    deadline: float | None,
) -> ParsedCall:
    """Validates `request` and maps it to domain objects, or raises a TokenwireError."""
    v = _Violations()
    limits = config.limits
    bounds = request_bounds(config)

    if request.request_id and not is_valid_request_id(request.request_id):
        v.add(
            "request_id",
            f"at most {MAX_REQUEST_ID_LENGTH} printable ASCII characters",
            "INVALID_REQUEST_ID",
        )

    messages: list[Message] = []
    if not request.messages:
        v.add("messages", "at least one message is required", "MESSAGES_EMPTY")
    elif len(request.messages) > limits.max_messages:
        v.add("messages", f"at most {limits.max_messages} messages", "TOO_MANY_MESSAGES")
    prompt_bytes = 0
    call_ids: set[str] = set()
    for index, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            v.add(
                f"messages[{index}].role",
                "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL",
                "INVALID_ROLE",
            )
        prompt_bytes += len(message.content.encode())
        if message.tool_calls or message.tool_call_id or role is Role.TOOL:
            # Tool turns only: a plain conversation pays for the three tests above.
            calls, call_id = parse_tool_turn(index, message, role, call_ids, v.add)
            prompt_bytes += sum(len(c.arguments.encode()) for c in calls)
            # A tool may answer with nothing; an assistant turn may be only calls.
            if not (message.content or role is Role.TOOL or calls):
                v.add(f"messages[{index}].content", "must not be empty", "EMPTY_CONTENT")
            if role is not None:
                messages.append(Message(role, message.content, calls, call_id))
            continue
        if not message.content:
            v.add(f"messages[{index}].content", "must not be empty", "EMPTY_CONTENT")
        if role is not None:
            messages.append(Message(role, message.content))
    # Tools' schemas and a response format reach the model as prompt too, so
    # they count against the same bound (a huge schema is a huge prompt).
    schema_bytes = 0
    if request.tools or request.HasField("response_format"):
        schema_bytes = sum(t.ByteSize() for t in request.tools)
        schema_bytes += request.response_format.ByteSize()
    if prompt_bytes + schema_bytes > limits.max_prompt_bytes:
        v.add(
            "messages" if prompt_bytes > limits.max_prompt_bytes else "tools",
            f"prompt is {prompt_bytes + schema_bytes} bytes"
            + (f" ({schema_bytes} of them tools and response format)" if schema_bytes else "")
            + f"; the limit is {limits.max_prompt_bytes}",
            "PROMPT_TOO_LARGE",
        )

    params = request.params
    max_tokens = params.max_tokens or limits.default_max_tokens
    if not bounds["params.max_tokens"].admits(params.max_tokens):
        v.add(
            "params.max_tokens",
            f"{bounds['params.max_tokens'].describe()} on this server (0: the server default)",
            "INVALID_MAX_TOKENS" if params.max_tokens < 0 else "MAX_TOKENS_TOO_LARGE",
        )
    temperature = params.temperature if params.HasField("temperature") else None
    if temperature is not None and not bounds["params.temperature"].admits(temperature):
        v.add("params.temperature", bounds["params.temperature"].describe(), "INVALID_TEMPERATURE")
    top_p = params.top_p if params.HasField("top_p") else None
    if top_p is not None and not bounds["params.top_p"].admits(top_p):
        v.add("params.top_p", bounds["params.top_p"].describe(), "INVALID_TOP_P")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        v.add("params.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences", "TOO_MANY_STOPS")
    for index, stop in enumerate(params.stop):
        if not stop:
            v.add(f"params.stop[{index}]", "must not be empty", "EMPTY_STOP")

    if len(request.labels) > limits.max_labels:
        v.add("labels", f"at most {limits.max_labels} labels", "TOO_MANY_LABELS")
    for key, value in request.labels.items():
        if not key or len(key) > MAX_LABEL_KEY or len(value) > MAX_LABEL_VALUE:
            v.add(
                f"labels[{key}]",
                f"keys 1..{MAX_LABEL_KEY} and values at most {MAX_LABEL_VALUE} characters",
                "INVALID_LABEL",
            )

    tools = parse_tools(request.tools, v.add) if request.tools else ()
    tool_choice = (
        parse_tool_choice(request.tool_choice, tools, v.add)
        if request.HasField("tool_choice")
        else None
    )
    response_format = (
        parse_response_format(request.response_format, v.add)
        if request.HasField("response_format")
        else None
    )

    delivery: DeliveryOptions | None = None
    if isinstance(request, pb.StreamRespondRequest):
        delivery = _delivery_options(request, config, bounds, max_tokens, v)

    try:
        backend, model = registry.resolve(request.model)
    except TokenwireError:
        if v.items:  # the request's own problems first, as before the model is known
            raise v.error() from None
        raise
    # Labels a backend reads (simulator knobs) join the same BadRequest, so
    # one round trip names every offending field.
    for problem in backend.check_labels(request.labels):
        v.add(problem.field, problem.description, "INVALID_SIMULATOR_KNOB")
    if v.items:
        raise v.error()
    generation = GenerationRequest(
        model=model.name,
        messages=tuple(messages),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
        labels=dict(request.labels),
        deadline=deadline,
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
    )
    return ParsedCall(backend=backend, model=model, generation=generation, delivery=delivery)


def _delivery_options(
    request: pb.StreamRespondRequest,
    config: Config,
    bounds: dict[str, Range],
    max_tokens: int,
    v: _Violations,
) -> DeliveryOptions:
    d = config.delivery
    mode = _MODES.get(request.delivery_mode)
    if mode is None:
        v.add("delivery_mode", "must be AUTO, STREAM or BUFFERED", "INVALID_DELIVERY_MODE")
        mode = DeliveryMode.AUTO
    per_chunk = request.chunking.max_tokens_per_chunk or d.default_max_tokens_per_chunk
    if not bounds["chunking.max_tokens_per_chunk"].admits(request.chunking.max_tokens_per_chunk):
        v.add(
            "chunking.max_tokens_per_chunk",
            f"{bounds['chunking.max_tokens_per_chunk'].describe()} on this server"
            " (0: the server default)",
            "INVALID_CHUNKING",
        )
    max_delay = 0.0
    if request.chunking.HasField("max_delay"):
        delay = request.chunking.max_delay
        max_delay = delay.seconds + delay.nanos / 1e9
        # A Duration's nanos lie within one second (google/protobuf/duration.proto);
        # a larger value is not a normalised Duration, whatever the sum comes to.
        if not (0 <= delay.nanos <= 999_999_999 and bounds["chunking.max_delay"].admits(max_delay)):
            v.add(
                "chunking.max_delay",
                f"{bounds['chunking.max_delay'].describe()} on this server"
                " (a Duration with nanos 0..999999999)",
                "INVALID_CHUNKING",
            )
            max_delay = 0.0
    return DeliveryOptions(
        mode=mode,
        max_tokens=max_tokens,
        max_tokens_per_chunk=max(1, per_chunk),
        max_delay=max(0.0, max_delay),
        auto_short_max_tokens=d.auto_short_max_tokens,
        auto_buffer_window=d.auto_buffer_window,
        heartbeat_interval=d.heartbeat_interval,
    )
