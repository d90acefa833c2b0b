"""The response store interface.

A store keeps responses (their chunk log and ending) for a bounded retention
after they finish, and an index from a caller's request id to the response
it started, so that a resumed call replays the log and a retried call
attaches instead of generating twice.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from tokenwire_server.delivery.response import LiveResponse


@dataclass(frozen=True, slots=True)
class Attached:
    """The outcome of registering a request id: a fresh or an existing response."""

    response: LiveResponse
    existing: bool


class ResponseStore(abc.ABC):
    @abc.abstractmethod
    def register(
        self, response: LiveResponse, idempotency_key: str | None, fingerprint: str
    ) -> Attached:
        """Stores a new response, or returns the live one already started for the key.

        Raises `RequestIdReused` when the key is known with another fingerprint.
        """

    @abc.abstractmethod
    def get(self, response_id: str) -> LiveResponse | None:
        """The response, if it is still retained."""

    @abc.abstractmethod
    def finished(self, response: LiveResponse) -> None:
        """Starts the retention clock of an ended response."""

    @abc.abstractmethod
    def __len__(self) -> int: ...
