"""The content checks a request asked for, run once over the final payload.

With a JSON `response_format` the final text is checked against it
(`json_schema`); when the model called tools, each call's arguments against
its tool's schema (`tool_arguments`). They run after governance, on what the
caller receives, so a redaction that broke a schema is reported, not hidden.
The request's schemas are compiled once, when the first check needs them.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import GenerationRequest, ToolCall
from tokenwire_server.structured.checks import check_json_output, check_tool_arguments
from tokenwire_server.structured.schemas import CompiledSchemas


class OutputChecks:
    """One response's content checks."""

    __slots__ = ("_format", "_schemas")

    def __init__(self, request: GenerationRequest) -> None:
        self._format = request.response_format
        self._schemas = CompiledSchemas(request.tools, request.response_format)

    @staticmethod
    def wanted(request: GenerationRequest) -> bool:
        """Whether a response to `request` may need any check (plain text: no)."""
        fmt = request.response_format
        return bool(request.tools) or (fmt is not None and fmt.is_json)

    def final(self, text: str, calls: Sequence[ToolCall]) -> tuple[pb.VerificationCheck, ...]:
        checks: list[pb.VerificationCheck] = []
        if self._format is not None and self._format.is_json:
            checks.append(check_json_output(text, self._format, self._schemas))
        if calls:
            checks.append(check_tool_arguments(calls, self._schemas))
        return tuple(checks)
