"""The response store interface.

A store keeps responses (their chunk log and ending) for a bounded retention
after they finish, and an index from a caller's request id to the response
it started, so that a resumed call replays the log and a retried call
attaches instead of generating twice. The in-memory store serves one
replica; the Redis store lets several replicas behind one name share them.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from tokenwire_server.delivery.response import LiveResponse


@dataclass(frozen=True, slots=True)
class Attached:
    """The outcome of registering a request id: a fresh or an existing response."""

    response: LiveResponse
    existing: bool


@dataclass(frozen=True, slots=True)
class Orphan:
    """A response whose replica died, now owned here: continue it, or end it."""

    response: LiveResponse
    #: The serialized request that started it.
    request: bytes


#: The request, serialized only when a store needs it (a shared one does).
SerializedRequest = Callable[[], bytes]


class ResponseStore(abc.ABC):
    @abc.abstractmethod
    async def register(
        self,
        response: LiveResponse,
        idempotency_key: str | None,
        fingerprint: str,
        request: SerializedRequest,
    ) -> Attached:
        """Stores a new response, or returns the one already started for the key.

        The key (tenant and the caller's request id) is None when the caller gave
        no id; a known key stays known while its response is retained.
        `request` gives the serialized request, for a replica that takes over.
        Raises `RequestIdReused` when the key is known with another fingerprint,
        and `StoreUnavailable` when a shared store it needs cannot be reached.
        """

    @abc.abstractmethod
    async def get(self, response_id: str) -> LiveResponse | None:
        """The response, if it is still retained (here or, shared, elsewhere)."""

    @abc.abstractmethod
    def finished(self, response: LiveResponse) -> None:
        """Starts the retention clock of an ended response."""

    async def request_cancel(self, response: LiveResponse) -> None:
        """Stops a response's generation, wherever it runs."""
        response.stop_generation()

    def running_here(self) -> list[LiveResponse]:
        """Responses this process generates that only it can finish: the ones a
        stopping server must end itself so their readers get a proper status.
        A shared store returns none, because another replica takes them over."""
        return []

    def shared_here(self) -> list[LiveResponse]:
        """Responses this process holds that another replica can continue or
        replay (a shared log): a stopping server ends their readers here with
        SERVER_STOPPING, so each resumes elsewhere. None without a shared store."""
        return []

    async def next_orphan(self) -> Orphan:
        """Waits for a response whose replica died and that this replica now
        owns. The servicer asks, continues it if it can, and says so with
        `settle_orphan`; a store that serves one replica never has any."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def settle_orphan(self, orphan: Orphan, continued: bool) -> None:  # noqa: B027
        """Records whether an orphan continues here (its generation runs) or ends."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Stops background work at shutdown."""
