"""The embedded default store: responses in this process, bounded three ways.

Ended responses are kept for `retention` seconds, and at most
`max_responses` of them and `max_bytes` of memory; the oldest go first. Once
its last reader has left, an ended response is kept packed (one bytes object,
delivery/packing.py), so the bound counts what it really takes and the
process stays flat however many calls it has served; a call that resumes or
retries into it gets it unpacked. Running responses are never evicted (they
are bounded by the server's concurrency and `max_tokens`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from tokenwire_server.delivery.response import LiveResponse
from tokenwire_server.errors import RequestIdReused
from tokenwire_server.store.base import Attached, ResponseStore, SerializedRequest

#: What indexing one ended response costs besides its packed bytes (its id,
#: the retention entry, the dict slots), measured with tracemalloc.
ENTRY_BYTES = 320


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
        #: Running responses, and ended ones that are not packed yet.
        self._responses: dict[str, LiveResponse] = {}
        #: Ended responses, packed once idle (LiveResponse.pack_when_idle).
        self._packed: dict[str, bytes] = {}
        self._by_key: dict[str, tuple[str, str]] = {}
        self._keys: dict[str, str] = {}
        #: Ended responses, oldest first: response id -> (expiry, bytes).
        self._ended: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._ended_bytes = 0

    def __len__(self) -> int:
        return len(self._responses) + len(self._packed)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._responses or response_id in self._packed

    def is_packed(self, response_id: str) -> bool:
        """Whether an ended response is kept packed already (its last reader left)."""
        return response_id in self._packed

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
            existing = None if known is None else self._retained(known[0])
            if known is not None and existing is not None:
                response_id, known_fingerprint = known
                if known_fingerprint != fingerprint:
                    raise RequestIdReused(
                        "this request id was used for a different request",
                        metadata={"responseId": response_id},
                    )
                return Attached(existing, existing=True)
            self._by_key[idempotency_key] = (response.response_id, fingerprint)
            self._keys[response.response_id] = idempotency_key
        self._responses[response.response_id] = response
        return Attached(response, existing=False)

    async def get(self, response_id: str) -> LiveResponse | None:
        self._evict()
        return self._retained(response_id)

    def _retained(self, response_id: str) -> LiveResponse | None:
        response = self._responses.get(response_id)
        if response is None:
            packed = self._packed.get(response_id)
            if packed is not None:
                response = LiveResponse.unpacked(packed)
        return response

    def running_here(self) -> list[LiveResponse]:
        return [r for r in self._responses.values() if not r.done]

    def finished(self, response: LiveResponse) -> None:
        if response.response_id not in self._responses or response.response_id in self._ended:
            return
        size = response.retained_bytes  # until it is packed
        self._ended[response.response_id] = (self._clock() + self._retention, size)
        self._ended_bytes += size
        self._evict()
        response.pack_when_idle(self._keep_packed)

    def _keep_packed(self, response: LiveResponse, packed: bytes) -> None:
        response_id = response.response_id
        entry = self._ended.get(response_id)
        if entry is None or self._responses.get(response_id) is not response:
            return  # evicted while a reader still read it
        del self._responses[response_id]
        self._packed[response_id] = packed
        size = len(packed) + ENTRY_BYTES
        self._ended[response_id] = (entry[0], size)
        self._ended_bytes += size - entry[1]
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
            self._packed.pop(response_id, None)
            key = self._keys.pop(response_id, None)
            if key is not None:
                self._by_key.pop(key, None)
