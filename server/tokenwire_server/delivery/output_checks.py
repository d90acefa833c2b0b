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
from tokenwire_server.domain import GenerationRequest, ToolCall, ToolChoice, ToolChoiceMode
from tokenwire_server.structured.checks import (
    JSON_SCHEMA,
    TOOL_ARGUMENTS,
    check_json_output,
    check_tool_arguments,
    early_stop_check,
)
from tokenwire_server.structured.schemas import CompiledSchemas
from tokenwire_server.structured.viability import Viability


class OutputChecks:
    """One response's content checks."""

    __slots__ = ("_choice", "_format", "_schemas")

    def __init__(self, request: GenerationRequest) -> None:
        self._format = request.response_format
        self._choice = request.tool_choice
        self._schemas = CompiledSchemas(request.tools, request.response_format)

    @staticmethod
    def wanted(request: GenerationRequest) -> bool:
        """Whether a response to `request` may need any check (plain text: no)."""
        fmt = request.response_format
        return bool(request.tools or request.tool_choice) or (fmt is not None and fmt.is_json)

    def final(
        self,
        text: str,
        calls: Sequence[ToolCall],
        stopped: pb.VerificationCheck | None = None,
    ) -> tuple[pb.VerificationCheck, ...]:
        """`stopped`: the check strict mode failed early; it stands for its kind
        (the cut-off output would only fail it again, less precisely)."""
        checks: list[pb.VerificationCheck] = []
        if self._format is not None and self._format.is_json:
            if stopped is not None and stopped.name == JSON_SCHEMA:
                checks.append(stopped)
            else:
                checks.append(check_json_output(text, self._format, self._schemas))
        if stopped is not None and stopped.name == TOOL_ARGUMENTS:
            checks.append(stopped)
        else:
            choice = _choice_violations(self._choice, calls)
            if calls or choice:
                check = check_tool_arguments(calls, self._schemas)
                if choice:
                    check.violations.extend(choice)
                    check.outcome = pb.CHECK_OUTCOME_FAILED
                checks.append(check)
        return tuple(checks)


def _choice_violations(
    choice: ToolChoice | None, calls: Sequence[ToolCall]
) -> list[pb.CheckViolation]:
    """What the calls did against the request's `tool_choice`: an upstream that
    ignores it is reported, never silently passed on."""
    if choice is None or (choice.mode is ToolChoiceMode.AUTO and not choice.function_name):
        return []
    if choice.mode is ToolChoiceMode.NONE:
        return [
            pb.CheckViolation(
                code="TOOL_CALL_NOT_ALLOWED",
                message=f"tool_calls[{index}] {call.name}: tool_choice is NONE",
                json_pointer=f"/{index}",
            )
            for index, call in enumerate(calls)
        ]
    if not calls:
        wanted = choice.function_name or "a tool"
        return [
            pb.CheckViolation(
                code="NO_TOOL_CALL", message=f"tool_choice requires a call to {wanted}; none made"
            )
        ]
    if choice.function_name:
        return [
            pb.CheckViolation(
                code="WRONG_TOOL",
                message=f"tool_calls[{index}] {call.name}: tool_choice names "
                f"{choice.function_name}",
                json_pointer=f"/{index}",
            )
            for index, call in enumerate(calls)
            if call.name != choice.function_name
        ]
    return []


class StrictOutput:
    """Strict mode while the output streams: the first moment the text (a
    strict `response_format`) or a call's arguments (a `strict` tool) can no
    longer become valid, generation stops instead of paying for the rest."""

    __slots__ = ("_calls", "_text", "_tools", "failed")

    def __init__(self, request: GenerationRequest) -> None:
        fmt = request.response_format
        self._text = Viability.for_format(fmt) if fmt is not None and fmt.strict else None
        self._tools = {tool.name: tool for tool in request.tools if tool.strict}
        self._calls: dict[int, Viability | None] = {}
        #: The failed check, once the output stopped being viable.
        self.failed: pb.VerificationCheck | None = None

    @staticmethod
    def wanted(request: GenerationRequest) -> bool:
        fmt = request.response_format
        return (fmt is not None and fmt.is_json and fmt.strict) or any(
            tool.strict for tool in request.tools
        )

    def text(self, text: str) -> bool:
        """True once the text can no longer satisfy the response format."""
        if self._text is None or self.failed is not None:
            return self.failed is not None
        violation = self._text.feed(text)
        if violation is not None:
            self.failed = early_stop_check(JSON_SCHEMA, violation)
        return violation is not None

    def fragment(self, position: int, name: str, arguments: str) -> bool:
        """True once call `position`'s arguments can no longer satisfy its
        strict tool's schema (`name` on the call's first fragment)."""
        if self.failed is not None:
            return True
        if position not in self._calls:
            spec = self._tools.get(name)
            self._calls[position] = Viability.for_tool(spec) if spec is not None else None
        viability = self._calls[position]
        if viability is None:
            return False
        violation = viability.feed(arguments)
        if violation is None:
            return False
        located = pb.CheckViolation()
        located.CopyFrom(violation)
        located.json_pointer = f"/{position}{violation.json_pointer}"
        self.failed = early_stop_check(TOOL_ARGUMENTS, located)
        return True
