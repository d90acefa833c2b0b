"""The embedded default store: responses in this process, bounded three ways.

Ended responses are kept for `retention` seconds, and at most
`max_responses` of them and about `max_bytes` of their text; the oldest go
first. Running responses are never evicted (they are bounded by the server's
concurrency and `max_tokens`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from tokenwire_server.delivery.response import LiveResponse
from tokenwire_server.errors import RequestIdReused
from tokenwire_server.store.base import Attached, ResponseStore, SerializedRequest


class InMemoryResponseStore(ResponseStore):
    def __init__(
        self,
        retention: float,
        max_responses: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retention = retention
        self._max_responses = max_responses
        self._max_bytes = max_bytes
        self._clock = clock
        self._responses: dict[str, LiveResponse] = {}
        self._by_key: dict[str, tuple[str, str]] = {}
        self._keys: dict[str, str] = {}
        #: Ended responses, oldest first: response id -> (expiry, bytes).
        self._ended: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._ended_bytes = 0

    def __len__(self) -> int:
        return len(self._responses)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._responses

    @property
    def retained_bytes(self) -> int:
        return self._ended_bytes

    async def register(
        self,
        response: LiveResponse,
        idempotency_key: str | None,
        fingerprint: str,
        request: SerializedRequest,
    ) -> Attached:
        self._evict()
        if idempotency_key is not None:
            known = self._by_key.get(idempotency_key)
            if known is not None and known[0] in self._responses:
                response_id, known_fingerprint = known
                if known_fingerprint != fingerprint:
                    raise RequestIdReused(
                        "this request id was used for a different request",
                        metadata={"responseId": response_id},
                    )
                return Attached(self._responses[response_id], existing=True)
            self._by_key[idempotency_key] = (response.response_id, fingerprint)
            self._keys[response.response_id] = idempotency_key
        self._responses[response.response_id] = response
        return Attached(response, existing=False)

    async def get(self, response_id: str) -> LiveResponse | None:
        self._evict()
        return self._responses.get(response_id)

    def running_here(self) -> list[LiveResponse]:
        return [r for r in self._responses.values() if not r.done]

    def finished(self, response: LiveResponse) -> None:
        if response.response_id not in self._responses or response.response_id in self._ended:
            return
        response.keep_compact()
        size = response.retained_bytes
        self._ended[response.response_id] = (self._clock() + self._retention, size)
        self._ended_bytes += size
        self._evict()

    def _evict(self) -> None:
        now = self._clock()
        while self._ended:
            response_id, (expiry, size) = next(iter(self._ended.items()))
            over = len(self._ended) > self._max_responses or self._ended_bytes > self._max_bytes
            if expiry > now and not over:
                break
            self._ended.popitem(last=False)
            self._ended_bytes -= size
            self._responses.pop(response_id, None)
            key = self._keys.pop(response_id, None)
            if key is not None:
                self._by_key.pop(key, None)
