"""Reviews shared by several replicas through Redis (the responses' Redis).

Keys, per review id V of response R and tenant T:

* `tw:review:V`              hash: `state`, `tenant`, `seq`, `body` (the review as JSON);
* `tw:review:rsp:R`          V: a response has at most one review;
* `tw:review:t:T:all`        sorted set of T's review ids by `seq` (listing, paging);
* `tw:review:t:T:<state>`    the same per state;
* `tw:review:due`            sorted set of PENDING ids by expiry time (the sweeper);
* `tw:review:seq`            the counter `seq` comes from.

Creating and settling are Lua scripts, so a review leaves PENDING exactly once
whichever replica decides or expires it. A decided review is kept
`keep_decided` (30 days), then Redis forgets it; listing skips (and unlinks)
ids whose review is gone.

Every settle publishes V on `tw:review:changed`; each replica with watchers
listens there and wakes them. Pub/sub can drop a message (a reconnect), so
watchers also re-read every `poll_interval` (2 s). A Redis that cannot be
reached fails the call with UNAVAILABLE `STORE_UNAVAILABLE`, like responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tokenwire_server.review.model import Review, ReviewState
from tokenwire_server.review.store import KEEP_DECIDED, ReviewStore
from tokenwire_server.store.redis_store import (
    OUTAGE_ERRORS,
    STORE_TIMEOUT,
    Outage,
    store_unavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
CHANNEL = "tw:review:changed"
_PREFIX = "tw:review:"

_CREATE = """
local existing = redis.call('get', KEYS[1])
if existing then return {0, existing} end
local seq = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1])
redis.call('hset', KEYS[4], 'state', 'pending', 'tenant', ARGV[2], 'body', ARGV[3], 'seq', seq)
redis.call('zadd', KEYS[5], seq, ARGV[1])
redis.call('zadd', KEYS[6], seq, ARGV[1])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[1])
return {1, ARGV[1]}
"""

_SETTLE = """
if redis.call('hget', KEYS[1], 'state') ~= 'pending' then
  redis.call('publish', ARGV[5], ARGV[1])
  return 0
end
local seq = redis.call('hget', KEYS[1], 'seq')
redis.call('hset', KEYS[1], 'state', ARGV[2], 'body', ARGV[3])
redis.call('zrem', KEYS[2], ARGV[1])
redis.call('zrem', KEYS[3], ARGV[1])
redis.call('zadd', KEYS[4], seq, ARGV[1])
redis.call('expire', KEYS[1], ARGV[4])
redis.call('expire', KEYS[5], ARGV[4])
redis.call('publish', ARGV[5], ARGV[1])
return 1
"""


def _review_key(review_id: str) -> str:
    return f"{_PREFIX}{review_id}"


def _response_key(response_id: str) -> str:
    return f"{_PREFIX}rsp:{response_id}"


def _tenant_key(tenant: str, state: ReviewState | None) -> str:
    return f"{_PREFIX}t:{tenant}:{state.value if state is not None else 'all'}"


_DUE = f"{_PREFIX}due"
_SEQ = f"{_PREFIX}seq"


class RedisReviewStore(ReviewStore):
    poll_interval = 2.0

    def __init__(self, url: str, keep_decided: float = KEEP_DECIDED) -> None:
        super().__init__()
        self._client: Any = redis.from_url(
            url,
            socket_connect_timeout=STORE_TIMEOUT,
            socket_timeout=STORE_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        self._url = url
        self._keep = max(1, int(keep_decided))
        self._outage = Outage()
        self._create = self._client.register_script(_CREATE)
        self._settle = self._client.register_script(_SETTLE)
        self._listener: asyncio.Task[None] | None = None

    async def _call(self, doing: str, work: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await work()
        except OUTAGE_ERRORS as error:
            self._outage.failed(error, doing)
            raise store_unavailable() from None
        self._outage.succeeded()
        return result

    def _read(self, raw: dict[bytes, bytes]) -> Review | None:
        if not raw or b"body" not in raw:
            return None
        return replace(Review.from_json(raw[b"body"]), seq=int(raw[b"seq"]))

    async def create(self, review: Review) -> Review:
        _, review_id = await self._call(
            "opening a review",
            lambda: self._create(
                keys=[
                    _response_key(review.response_id),
                    _SEQ,
                    _DUE,
                    _review_key(review.review_id),
                    _tenant_key(review.tenant, None),
                    _tenant_key(review.tenant, ReviewState.PENDING),
                ],
                args=[review.review_id, review.tenant, review.to_json(), review.expires_at],
            ),
        )
        stored = await self.get(review_id.decode() if isinstance(review_id, bytes) else review_id)
        if stored is None:  # the existing review was pruned: start again under the new id
            await self._call(
                "opening a review", lambda: self._client.delete(_response_key(review.response_id))
            )
            return await self.create(review)
        return stored

    async def get(self, review_id: str) -> Review | None:
        raw = await self._call(
            "reading a review", lambda: self._client.hgetall(_review_key(review_id))
        )
        return self._read(raw)

    async def page(
        self, tenant: str, state: ReviewState | None, after_seq: int, limit: int
    ) -> list[Review]:
        key = _tenant_key(tenant, state)
        found: list[Review] = []
        cursor = after_seq
        while len(found) < limit:
            ids = await self._call(
                "listing reviews",
                lambda c=cursor: self._client.zrangebyscore(  # type: ignore[misc]
                    key, f"({c}", "+inf", start=0, num=limit - len(found), withscores=True
                ),
            )
            if not ids:
                break

            async def fetch(chunk: list[tuple[bytes, float]] = ids) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for member, _ in chunk:
                    pipe.hgetall(_review_key(member.decode()))
                return list(await pipe.execute())

            rows = await self._call("listing reviews", fetch)
            gone: list[bytes] = []
            for (member, score), raw in zip(ids, rows, strict=True):
                cursor = int(score)
                review = self._read(raw)
                if review is None or review.tenant != tenant:
                    gone.append(member)
                    continue
                if state is None or review.state is state:
                    found.append(review)
            if gone:
                await self._unlink(key, gone)
        return found

    async def _unlink(self, key: str, members: list[bytes]) -> None:
        """Drops ids whose review Redis forgot (expired after `keep_decided`)."""
        await self._call("listing reviews", lambda: self._client.zrem(key, *members))

    async def settle(self, review: Review) -> bool:
        try:
            settled = await self._call(
                "deciding a review",
                lambda: self._settle(
                    keys=[
                        _review_key(review.review_id),
                        _DUE,
                        _tenant_key(review.tenant, ReviewState.PENDING),
                        _tenant_key(review.tenant, review.state),
                        _response_key(review.response_id),
                    ],
                    args=[
                        review.review_id,
                        review.state.value,
                        review.to_json(),
                        self._keep,
                        CHANNEL,
                    ],
                ),
            )
        finally:
            self.notifier.notify(review.review_id)
        return bool(settled)

    async def due(self, now: float, limit: int) -> list[str]:
        ids = await self._call(
            "finding expired reviews",
            lambda: self._client.zrangebyscore(_DUE, "-inf", now, start=0, num=limit),
        )
        return [member.decode() for member in ids]

    async def prune(self, decided_before: float) -> int:
        return 0  # Redis forgets decided reviews by itself (`keep_decided`)

    @contextlib.contextmanager
    def _watching(self, review_id: str) -> Iterator[asyncio.Event]:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="review changes")
        with self.notifier.subscribe(review_id) as event:
            yield event

    def changes(self, review_id: str) -> contextlib.AbstractContextManager[asyncio.Event]:
        return self._watching(review_id)

    async def _listen(self) -> None:
        """Wakes this replica's watchers on every decision, whichever replica made it."""
        client: Any = redis.from_url(
            self._url, socket_connect_timeout=STORE_TIMEOUT, socket_timeout=STORE_TIMEOUT + 2
        )
        try:
            while self.notifier.watched:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(CHANNEL)
                    while self.notifier.watched:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self.notifier.notify(bytes(message["data"]).decode())
                except OUTAGE_ERRORS as error:
                    self._outage.failed(error, "listening for review decisions")
                    await asyncio.sleep(0.5)  # watchers poll meanwhile
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
        finally:
            await client.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self._client.aclose()
