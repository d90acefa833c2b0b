"""The one interface every backend implements.

A backend turns a `GenerationRequest` into an async iterator of token texts
and tool-call fragments (`ToolCallFragment`), optionally ending with a
`Finish` that carries the finish reason and counts. A backend that cannot
honour the request's `tools` or `response_format` maps them as closely as its
model allows; the pipeline checks the output either way.
Tokens that arrive together (one network read from an upstream) may come as
one list: the pipeline then handles them in one step instead of one async
hand-off each, which is most of the per-token cost at line rate.
Cancellation is honoured by construction: the pipeline cancels the task that
iterates, so a backend only has to await something between tokens (network
reads, sleeps) and let `CancelledError` propagate.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import AsyncIterator, Mapping

from tokenwire_server.domain import Finish, GenerationRequest, ToolCallFragment
from tokenwire_server.errors import FieldViolation

#: What `Backend.generate` yields.
BackendItem = str | list[str] | ToolCallFragment | Finish


def new_tool_call_id() -> str:
    """An id for a call whose upstream sent none: "call_" and 24 random hex
    digits, the shape OpenAI's ids have, unique enough that a caller can key
    its tool results by it across the calls of a conversation."""
    return "call_" + secrets.token_hex(12)


class Backend(abc.ABC):
    """An async token source for some models."""

    #: Route name reported in `Completed.serving.backend`.
    name: str
    #: What serves the tokens, as the `gen_ai.provider.name` of the OpenTelemetry
    #: GenAI conventions (the metrics' `gen_ai_provider_name` label).
    provider: str = "_OTHER"
    #: The same request always yields the same tokens, so another replica can
    #: regenerate a response and continue it exactly where its log ends.
    deterministic: bool = False
    #: Its first token waits on a network round trip at least: the call's own
    #: bookkeeping (store registration, records) can run while the request is out.
    waits_on_network: bool = False

    @abc.abstractmethod
    def models(self) -> Mapping[str, str]:
        """Model name -> model version, for every model this backend serves."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[BackendItem]:
        """Yields token texts (one, or a list of those that arrived together) and
        tool-call fragments, in the order the model produced them, then
        optionally one `Finish` (`FinishReason.TOOL_CALLS` when it called tools).

        Raises `tokenwire_server.errors.TokenwireError` subclasses for failures
        a caller should see as a specific status (e.g. `BackendUnavailable`).
        """

    def check_labels(self, labels: Mapping[str, str]) -> list[FieldViolation]:
        """What is wrong with the labels this backend reads (its knobs), so a
        bad one is refused before a response exists; none by default."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Releases connections at server shutdown."""
