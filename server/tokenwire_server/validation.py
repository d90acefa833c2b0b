"""Request validation: every problem found is named by its field in one BadRequest.

Collecting all violations (instead of stopping at the first) lets a caller fix
a request in one round trip; the ErrorInfo reason names the most specific
problem so clients can branch on it.
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
from tokenwire_server.errors import FieldViolation, InvalidRequest

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


def parse_call(
    request: pb.RespondRequest | pb.StreamRespondRequest,
    config: Config,
    registry: BackendRegistry,
    deadline: float | None,
) -> ParsedCall:
    """Validates `request` and maps it to domain objects, or raises a TokenwireError."""
    v = _Violations()
    limits = config.limits

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
    for index, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            v.add(
                f"messages[{index}].role",
                "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                "INVALID_ROLE",
            )
        if not message.content:
            v.add(f"messages[{index}].content", "must not be empty", "EMPTY_CONTENT")
        prompt_bytes += len(message.content.encode())
        if role is not None:
            messages.append(Message(role, message.content))
    if prompt_bytes > limits.max_prompt_bytes:
        v.add(
            "messages",
            f"prompt is {prompt_bytes} bytes; the limit is {limits.max_prompt_bytes}",
            "PROMPT_TOO_LARGE",
        )

    params = request.params
    max_tokens = params.max_tokens or limits.default_max_tokens
    if params.max_tokens < 0:
        v.add("params.max_tokens", "must not be negative", "INVALID_MAX_TOKENS")
    elif params.max_tokens > limits.max_tokens_cap:
        v.add(
            "params.max_tokens",
            f"at most {limits.max_tokens_cap} on this server",
            "MAX_TOKENS_TOO_LARGE",
        )
    temperature = params.temperature if params.HasField("temperature") else None
    if temperature is not None and not (0.0 <= temperature <= 2.0):
        v.add("params.temperature", "must be between 0 and 2", "INVALID_TEMPERATURE")
    top_p = params.top_p if params.HasField("top_p") else None
    if top_p is not None and not (0.0 < top_p <= 1.0):
        v.add("params.top_p", "must be greater than 0 and at most 1", "INVALID_TOP_P")
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

    delivery: DeliveryOptions | None = None
    if isinstance(request, pb.StreamRespondRequest):
        delivery = _delivery_options(request, config, max_tokens, v)

    if v.items:
        raise InvalidRequest(
            f"invalid request: {v.items[0].field}: {v.items[0].description}"
            + (f" (and {len(v.items) - 1} more)" if len(v.items) > 1 else ""),
            reason=v.reason,
            violations=v.items,
        )

    backend, model = registry.resolve(request.model)
    knob_problems = backend.check_labels(request.labels)
    if knob_problems:
        raise InvalidRequest(
            f"invalid request: {knob_problems[0].field}: {knob_problems[0].description}",
            reason="INVALID_SIMULATOR_KNOB",
            violations=knob_problems,
        )
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
    )
    return ParsedCall(backend=backend, model=model, generation=generation, delivery=delivery)


def _delivery_options(
    request: pb.StreamRespondRequest, config: Config, max_tokens: int, v: _Violations
) -> DeliveryOptions:
    d = config.delivery
    mode = _MODES.get(request.delivery_mode)
    if mode is None:
        v.add("delivery_mode", "must be AUTO, STREAM or BUFFERED", "INVALID_DELIVERY_MODE")
        mode = DeliveryMode.AUTO
    per_chunk = request.chunking.max_tokens_per_chunk or d.default_max_tokens_per_chunk
    if request.chunking.max_tokens_per_chunk < 0:
        v.add("chunking.max_tokens_per_chunk", "must not be negative", "INVALID_CHUNKING")
    elif request.chunking.max_tokens_per_chunk > d.max_tokens_per_chunk_limit:
        v.add(
            "chunking.max_tokens_per_chunk",
            f"at most {d.max_tokens_per_chunk_limit} on this server",
            "INVALID_CHUNKING",
        )
    max_delay = 0.0
    if request.chunking.HasField("max_delay"):
        delay = request.chunking.max_delay
        max_delay = delay.seconds + delay.nanos / 1e9
        if delay.seconds < 0 or delay.nanos < 0 or not math.isfinite(max_delay):
            v.add("chunking.max_delay", "must not be negative", "INVALID_CHUNKING")
        elif max_delay > d.max_chunk_delay_limit:
            v.add(
                "chunking.max_delay",
                f"at most {d.max_chunk_delay_limit:g}s on this server",
                "INVALID_CHUNKING",
            )
    return DeliveryOptions(
        mode=mode,
        max_tokens=max_tokens,
        max_tokens_per_chunk=max(1, per_chunk),
        max_delay=max(0.0, max_delay),
        auto_short_max_tokens=d.auto_short_max_tokens,
        auto_buffer_window=d.auto_buffer_window,
        heartbeat_interval=d.heartbeat_interval,
    )
