"""Responses shared by several replicas through Redis (redis-py asyncio).

Keys, per response id R:

* `tw:rsp:R:meta`  hash: the serialized request and what a reader needs
  (model, policy, delivery options, resumability);
* `tw:rsp:R:log`   stream: one entry per chunk (sequence, text, offset,
  tokens, actions, emission time), then one end entry (state, outcome or
  error);
* `tw:rsp:R:owner` the generating replica's id, a lease renewed while it
  generates; `tw:rsp:R:cancel` a cancel request for the owner;
* `tw:req:K`       request id K → "R<TAB>fingerprint", for idempotent retries.

The owner writes every chunk to the log before it sends it (the planner
awaits `durable`), batched per event-loop turn, so any chunk a caller holds
can be replayed by any replica. A replica asked for a response it does not
own mirrors it: replays the log, then follows new entries live. If the
owner's lease lapses without an end entry, the mirror takes the response
over: a deterministic backend regenerates it and the governed text already
logged is skipped (governance is split-independent, so it comes out
identical and is checked), then generation continues; any other backend ends
the response with UNAVAILABLE `RESPONSE_OWNER_LOST` and the last sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis

from tokenwire_server.delivery.planner import DeliveryOptions
from tokenwire_server.delivery.response import ChunkRecord, LiveResponse, Outcome, State
from tokenwire_server.domain import (
    Action,
    DeliveryMode,
    FinishReason,
    ModelInfo,
    Operator,
    ServingPath,
    Verdict,
)
from tokenwire_server.errors import (
    BackendUnavailable,
    RequestIdReused,
    ResponseCancelled,
    TokenwireError,
)
from tokenwire_server.store.base import Attached, ResponseStore

log = logging.getLogger(__name__)

#: Called to continue a response whose owner died; False when it cannot be.
Takeover = Callable[[LiveResponse, bytes], Awaitable[bool]]


#: Renews a lease only for its holder: 1 when renewed, 0 when someone else holds it.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


_SWAP = """
local current = redis.call('get', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def _key(response_id: str, part: str) -> str:
    return f"tw:rsp:{response_id}:{part}"


def _actions_json(actions: tuple[Action, ...]) -> str:
    return json.dumps(
        [[a.rule_id, a.entity_type, int(a.operator), a.start, a.end] for a in actions]
    )


def _actions(raw: str) -> tuple[Action, ...]:
    return tuple(Action(r, e, Operator(o), s, t) for r, e, o, s, t in json.loads(raw))


def _entry_id(fields: dict[str, str | int], last_sequence: int) -> str:
    """Stream ids follow sequences (chunk n is n-1, the ending last-2), so a stale
    owner's append after a takeover is refused by Redis instead of interleaving."""
    if fields["k"] == "c":
        return f"{int(fields['s'])}-1"
    return f"{last_sequence}-2"


def _chunk_fields(record: ChunkRecord) -> dict[str, str | int]:
    return {
        "k": "c",
        "s": record.sequence,
        "t": record.text,
        "o": record.text_offset,
        "n": record.token_count,
        "a": _actions_json(record.actions),
        "e": record.emitted_at_ns,
    }


def _end_fields(response: LiveResponse) -> dict[str, str | int]:
    fields: dict[str, str | int] = {"k": "e", "state": response.state.value}
    if response.outcome is not None:
        o = response.outcome
        fields["outcome"] = json.dumps(
            {
                "final_text": o.final_text,
                "finish_reason": int(o.finish_reason),
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": o.completion_tokens,
                "verdict": int(o.verdict),
                "review_required": o.review_required,
                "actions": _actions_json(o.actions),
                "path": int(o.path),
                "attempts": o.attempts,
                "backend": o.backend,
            }
        )
    if response.error is not None:
        e = response.error
        fields["error"] = json.dumps(
            {
                "code": e.code.name,
                "reason": e.reason,
                "message": e.message,
                "metadata": e.metadata,
                "retry_after": e.retry_after,
            }
        )
    return fields


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(fields: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


class RedisLog:
    """The owner's writer: chunks and the ending go to the stream in order, batched."""

    def __init__(
        self,
        client: Any,
        response_id: str,
        ttl: float,
        retention: float,
        written: int = 0,
    ) -> None:
        self._client = client
        self._key = _key(response_id, "log")
        self._ttl = int(ttl)
        self._retention = int(retention)
        self._queue: list[dict[str, str | int]] = []
        #: Chunks up to this sequence are in the stream already.
        self._written = written
        self._last_sequence = written
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._ended = False
        self._task = asyncio.create_task(self._run(), name=f"log {response_id}")

    def append(self, record: ChunkRecord) -> None:
        self._queue.append(_chunk_fields(record))
        self._wake.set()

    def end(self, response: LiveResponse) -> None:
        self._queue.append(_end_fields(response))
        self._ended = True
        self._wake.set()

    async def durable(self, sequence: int) -> None:
        if self._failure is not None:
            raise BackendUnavailable(
                f"the response store is unavailable: {self._failure}", reason="STORE_UNAVAILABLE"
            )
        if self._written >= sequence:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((sequence, waiter))
        await waiter

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                try:
                    pipe = self._client.pipeline(transaction=False)
                    for fields in batch:
                        if fields["k"] == "c":
                            self._last_sequence = int(fields["s"])
                        pipe.xadd(self._key, fields, id=_entry_id(fields, self._last_sequence))
                    done = batch[-1]["k"] == "e"
                    pipe.expire(self._key, self._retention if done else self._ttl)
                    await pipe.execute()
                except Exception as error:  # fail the readers waiting on this write
                    self._failure = error
                    for _, waiter in self._waiters:
                        if not waiter.done():
                            waiter.set_exception(
                                BackendUnavailable(
                                    f"the response store is unavailable: {error}",
                                    reason="STORE_UNAVAILABLE",
                                )
                            )
                    self._waiters.clear()
                    return
                for fields in batch:
                    if fields["k"] == "c":
                        self._written = int(fields["s"])
                still = []
                for sequence, waiter in self._waiters:
                    if sequence <= self._written:
                        if not waiter.done():
                            waiter.set_result(None)
                    else:
                        still.append((sequence, waiter))
                self._waiters = still
            if self._ended and not self._queue:
                return


class RedisResponseStore(ResponseStore):
    def __init__(
        self,
        url: str,
        *,
        retention: float,
        lease_seconds: float,
        running_ttl: float,
        replica_id: str | None = None,
    ) -> None:
        # redis-py's types say bytes | str for everything; values are bytes here.
        self._client: Any = redis.from_url(url)
        self._retention = retention
        self._lease = lease_seconds
        self._running_ttl = running_ttl
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:12]}"
        self._local: dict[str, LiveResponse] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Set by the servicer: how to continue a response whose owner died.
        self.takeover: Takeover | None = None

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- registering (the owner) ----------------------------------------

    async def register(
        self, response: LiveResponse, idempotency_key: str | None, fingerprint: str, request: bytes
    ) -> Attached:
        if idempotency_key is not None:
            key = f"tw:req:{idempotency_key}"
            value = f"{response.response_id}\t{fingerprint}"
            if not await self._client.set(key, value, nx=True, ex=int(self._retention)):
                known = await self._client.get(key)
                if known is not None:
                    response_id, known_fingerprint = _text(known).split("\t", 1)
                    if known_fingerprint != fingerprint:
                        raise RequestIdReused(
                            "this request id was used for a different request",
                            metadata={"responseId": response_id},
                        )
                    for _ in range(40):  # the winner writes its metadata right after the key
                        existing = await self.get(response_id)
                        if existing is not None:
                            return Attached(existing, existing=True)
                        await asyncio.sleep(0.025)
                # The response behind the key expired: take the key over, but only if it
                # still names that response (another retry may have just done the same).
                swapped = await self._client.eval(
                    _SWAP, 1, key, _text(known or b""), value, int(self._retention)
                )
                if not swapped:
                    return await self.register(response, idempotency_key, fingerprint, request)
        await self.own(response, request)
        return Attached(response, existing=False)

    async def own(self, response: LiveResponse, request: bytes | None = None) -> None:
        """Makes this replica the response's writer: meta, lease, log."""
        response_id = response.response_id
        if request is not None:
            options = response.delivery
            meta: dict[str, str | bytes | int | float] = {
                "request": request,
                "request_id": response.request_id,
                "tenant": response.tenant,
                "model": response.model.name,
                "model_version": response.model.version,
                "backend": response.model.backend,
                "policy_id": response.policy_id,
                "policy_version": response.policy_version,
                "resumable": int(response.resumable),
                "detach_window": response.detach_window,
                "chunk_tokens": response.detached_chunk_tokens,
                "streaming": int(response.delivery is not None),
            }
            if options is not None:
                meta["delivery"] = json.dumps(
                    {
                        "mode": int(options.mode),
                        "max_tokens": options.max_tokens,
                        "max_tokens_per_chunk": options.max_tokens_per_chunk,
                        "max_delay": options.max_delay,
                        "auto_short_max_tokens": options.auto_short_max_tokens,
                        "auto_buffer_window": options.auto_buffer_window,
                        "heartbeat_interval": options.heartbeat_interval,
                    }
                )
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(_key(response_id, "meta"), mapping=meta)
            pipe.expire(_key(response_id, "meta"), int(self._running_ttl))
            pipe.set(_key(response_id, "owner"), self.replica_id, px=int(self._lease * 1000))
            await pipe.execute()
        response.log = RedisLog(
            self._client,
            response_id,
            self._running_ttl,
            self._retention,
            written=len(response.chunks),
        )
        self._local[response_id] = response
        self._spawn(self._hold_lease(response), f"lease {response_id}")

    async def _hold_lease(self, response: LiveResponse) -> None:
        owner, cancel = _key(response.response_id, "owner"), _key(response.response_id, "cancel")
        remote_readers = _key(response.response_id, "readers")
        try:
            while not response.done:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(response.wait_ended(), self._lease / 3)
                if response.done:
                    break
                try:
                    pipe = self._client.pipeline(transaction=False)
                    pipe.eval(_RENEW, 1, owner, self.replica_id, int(self._lease * 1000))
                    pipe.get(cancel)
                    pipe.exists(remote_readers)
                    still_owner, cancelled, read_elsewhere = await pipe.execute()
                except redis.RedisError as error:
                    # Keep serving local readers; another replica may take over meanwhile,
                    # and the log writer reports the store's failure to the readers.
                    log.warning("cannot renew the lease of %s: %s", response.response_id, error)
                    continue
                if not still_owner:
                    # Another replica took over while this one was silent: stop, and
                    # write nothing more (its log would be refused anyway).
                    log.warning("lost the lease of %s; stopping", response.response_id)
                    response.log = None
                    response.stop_generation()
                    return
                if cancelled:
                    response.stop_generation()
                elif read_elsewhere and not response.readers:
                    response.keep_alive()
        finally:
            with contextlib.suppress(Exception):
                await self._client.eval(_RELEASE, 1, owner, self.replica_id)

    def finished(self, response: LiveResponse) -> None:
        async def expire() -> None:
            with contextlib.suppress(Exception):
                await self._client.expire(_key(response.response_id, "meta"), int(self._retention))
            await asyncio.sleep(self._retention)
            self._local.pop(response.response_id, None)

        self._spawn(expire(), f"retain {response.response_id}")

    # ----- reading (any replica) -------------------------------------------

    async def get(self, response_id: str) -> LiveResponse | None:
        local = self._local.get(response_id)
        if local is not None:
            return local
        raw = await self._client.hgetall(_key(response_id, "meta"))
        if not raw:
            return None
        meta = {_text(k): v for k, v in raw.items()}
        mirror = self._mirror(response_id, meta)
        mirror.on_end(self.finished)
        mirror.on_orphaned = self._orphaned
        self._local[response_id] = mirror
        entries = await self._client.xrange(_key(response_id, "log"))
        last_id = "0-0"
        for entry_id, fields in entries:
            last_id = _text(entry_id)
            self._apply(mirror, _decode(fields))
        if not mirror.done:
            mirror.task = self._spawn(
                self._follow(mirror, last_id, bytes(meta["request"])), f"follow {response_id}"
            )
        else:
            self.finished(mirror)
        return mirror

    def _orphaned(self, mirror: LiveResponse) -> None:
        """A mirror's last reader left: stop following; the owner keeps the response."""
        if self._local.get(mirror.response_id) is mirror and not mirror.done:
            del self._local[mirror.response_id]
        if mirror.task is not None and not mirror.done:
            mirror.task.cancel()

    async def request_cancel(self, response: LiveResponse) -> None:
        """Cancel for a response this replica may only be mirroring."""
        if response.log is None and not response.done:
            await self._client.set(
                _key(response.response_id, "cancel"), 1, ex=int(self._running_ttl)
            )
        else:
            response.stop_generation()

    def _mirror(self, response_id: str, meta: dict[str, bytes]) -> LiveResponse:
        def text(name: str) -> str:
            return _text(meta[name])

        mirror = LiveResponse(
            response_id=response_id,
            request_id=text("request_id"),
            model=ModelInfo(text("model"), text("model_version"), text("backend")),
            policy_id=text("policy_id"),
            policy_version=text("policy_version"),
            max_pending_chars=1 << 30,
        )
        mirror.tenant = text("tenant") if "tenant" in meta else ""
        mirror.resumable = bool(int(text("resumable")))
        mirror.detach_window = float(text("detach_window"))
        mirror.detached_chunk_tokens = int(text("chunk_tokens"))
        if "delivery" in meta:
            d = json.loads(text("delivery"))
            mirror.delivery = DeliveryOptions(
                mode=DeliveryMode(d["mode"]),
                max_tokens=d["max_tokens"],
                max_tokens_per_chunk=d["max_tokens_per_chunk"],
                max_delay=d["max_delay"],
                auto_short_max_tokens=d["auto_short_max_tokens"],
                auto_buffer_window=d["auto_buffer_window"],
                heartbeat_interval=d["heartbeat_interval"],
            )
            if mirror.delivery.mode is DeliveryMode.BUFFERED:
                mirror.mode_used = DeliveryMode.BUFFERED
        return mirror

    def _apply(self, mirror: LiveResponse, fields: dict[str, str]) -> None:
        if fields["k"] == "c":
            if mirror.mode_used is None:
                mirror.mode_used = DeliveryMode.STREAM
            mirror.append_logged(
                ChunkRecord(
                    sequence=int(fields["s"]),
                    text=fields["t"],
                    text_offset=int(fields["o"]),
                    token_count=int(fields["n"]),
                    actions=_actions(fields["a"]),
                    emitted_at_ns=int(fields["e"]),
                )
            )
            return
        state = State(fields["state"])
        outcome = None
        if "outcome" in fields:
            o = json.loads(fields["outcome"])
            outcome = Outcome(
                final_text=o["final_text"],
                finish_reason=FinishReason(o["finish_reason"]),
                prompt_tokens=o["prompt_tokens"],
                completion_tokens=o["completion_tokens"],
                verdict=Verdict(o["verdict"]),
                review_required=o["review_required"],
                actions=_actions(o["actions"]),
                path=ServingPath(o["path"]),
                attempts=o["attempts"],
                backend=o["backend"],
            )
        error: TokenwireError | None = None
        if "error" in fields:
            e = json.loads(fields["error"])
            error = _rebuild_error(e)
        elif state is State.CANCELLED:
            error = ResponseCancelled("generation was stopped before it finished")
        mirror.end_logged(state, outcome, error)

    async def _follow(self, mirror: LiveResponse, last_id: str, request: bytes) -> None:
        log_key, owner_key = _key(mirror.response_id, "log"), _key(mirror.response_id, "owner")
        readers_key = _key(mirror.response_id, "readers")
        block_ms = max(50, int(self._lease * 1000 / 3))
        try:
            while not mirror.done:
                if mirror.readers:  # tell the owner someone here still reads
                    await self._client.set(readers_key, self.replica_id, px=int(self._lease * 2000))
                answer = await self._client.xread({log_key: last_id}, block=block_ms, count=1000)
                for _, entries in answer:
                    for entry_id, fields in entries:
                        last_id = _text(entry_id)
                        self._apply(mirror, _decode(fields))
                if answer or mirror.done:
                    continue
                if await self._client.exists(owner_key):
                    continue
                # The owner is gone and the log has no ending: take the response over.
                if not await self._client.set(
                    owner_key, self.replica_id, nx=True, px=int(self._lease * 1000)
                ):
                    continue  # another replica won the race; keep following
                await self._take_over(mirror, request)
                return
        except redis.RedisError as error:
            mirror.end_logged(
                State.FAILED,
                None,
                BackendUnavailable(
                    f"the response store is unavailable: {error}",
                    reason="STORE_UNAVAILABLE",
                    metadata={"responseId": mirror.response_id},
                ),
            )

    async def _take_over(self, mirror: LiveResponse, request: bytes) -> None:
        log.warning("taking over response %s from a lost replica", mirror.response_id)
        continued = self.takeover is not None and await self.takeover(mirror, request)
        if continued:
            await self.own(mirror)
            return
        mirror.end_logged(
            State.FAILED,
            None,
            BackendUnavailable(
                "the replica generating this response stopped and its backend cannot "
                "continue it here",
                reason="RESPONSE_OWNER_LOST",
                metadata={"responseId": mirror.response_id},
            ),
        )
        # Record the ending for everyone else, too.
        record = RedisLog(self._client, mirror.response_id, self._running_ttl, self._retention)
        record.end(mirror)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._client.aclose()


def _rebuild_error(raw: dict[str, Any]) -> TokenwireError:
    import grpc

    error = TokenwireError(
        raw["message"],
        reason=raw["reason"],
        metadata=raw.get("metadata") or {},
        retry_after=raw.get("retry_after"),
    )
    error.code = grpc.StatusCode[raw["code"]]
    return error
