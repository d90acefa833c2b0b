"""Domain objects the pipeline passes around.

They are plain frozen dataclasses so the backend, governance and delivery
layers never depend on protobuf; the servicer and codec translate at the edge.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def utf8_length(text: str) -> int:
    """The length of `text` in UTF-8 bytes, the unit of every offset on the wire.

    Most model output is ASCII, where the byte length is the character length;
    checking that is cheaper than encoding, which matters once per chunk."""
    return len(text) if text.isascii() else len(text.encode())


class Role(enum.IntEnum):
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    TOOL = 4


class DeliveryMode(enum.IntEnum):
    AUTO = 1
    STREAM = 2
    BUFFERED = 3


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    """How one call asked for its chunks (resolved against the server's limits)."""

    mode: DeliveryMode
    max_tokens: int
    max_tokens_per_chunk: int
    max_delay: float
    auto_short_max_tokens: int
    auto_buffer_window: float
    heartbeat_interval: float


class FinishReason(enum.IntEnum):
    STOP = 1
    LENGTH = 2
    STOP_SEQUENCE = 3
    POLICY_BLOCKED = 4
    TOOL_CALLS = 5
    INVALID_OUTPUT = 6


class Verdict(enum.IntEnum):
    ALLOWED = 1
    REDACTED = 2
    BLOCKED = 3


class ServingPath(enum.IntEnum):
    STREAMING = 1
    NON_STREAMING = 2


class Operator(enum.IntEnum):
    MASK = 1
    REPLACE = 2
    HASH = 3
    BLOCK = 4
    FLAG = 5


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made; `arguments` is JSON text (as governed,
    once it leaves the pipeline)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallFragment:
    """A piece of a tool call as a backend yields it.

    `index` is the call's position in the response (0-based, in the order the
    calls began). The first fragment of a call carries its `id` and `name`;
    later ones carry only the next piece of `arguments`. A backend whose
    upstream sends no id makes one up, so every call has one.
    """

    index: int
    arguments: str = ""
    id: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    #: The calls an assistant turn made.
    tool_calls: tuple[ToolCall, ...] = ()
    #: With `Role.TOOL`: the call this message answers.
    tool_call_id: str = ""


class ToolChoiceMode(enum.IntEnum):
    AUTO = 1
    NONE = 2
    REQUIRED = 3


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; `parameters` is a JSON Schema (plain
    JSON values), None when the function takes no arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """AUTO, NONE or REQUIRED; or, with `function_name`, that one tool."""

    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    function_name: str = ""


class ResponseFormatType(enum.IntEnum):
    TEXT = 1
    JSON_OBJECT = 2
    JSON_SCHEMA = 3


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The shape the model's text must have; `schema` with JSON_SCHEMA only."""

    type: ResponseFormatType = ResponseFormatType.TEXT
    schema_name: str = ""
    schema: Mapping[str, Any] | None = None
    strict: bool = False

    @property
    def is_json(self) -> bool:
        return self.type is not ResponseFormatType.TEXT


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a backend needs to generate; `deadline` is an absolute monotonic time."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    #: Functions the model may call, and whether it must.
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    #: None means free text.
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The last item a backend yields: why it stopped and what it counted.

    A backend that cannot count leaves a count as None and the pipeline counts
    the tokens it saw.
    """

    reason: FinishReason = FinishReason.STOP
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    path: ServingPath = ServingPath.STREAMING
    attempts: int = 1
    #: The upstream that served, when it is not the route's own (a fallback).
    backend: str | None = None


@dataclass(frozen=True, slots=True)
class Action:
    """A governance action; `start`/`end` are UTF-8 byte positions in the final text."""

    rule_id: str
    entity_type: str
    operator: Operator
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    backend: str
