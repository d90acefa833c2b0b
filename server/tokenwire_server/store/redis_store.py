"""Responses shared by several replicas through Redis (redis-py asyncio).

Keys, per response id R:

* `tw:rsp:R:meta`  hash: the serialized request and what a reader needs
  (model, policy, delivery options, resumability);
* `tw:rsp:R:log`   stream: one entry per chunk (sequence, text, offset,
  tokens, actions, emission time), then one end entry (state, outcome or
  error);
* `tw:rsp:R:owner` the generating replica's id, a lease renewed while it
  generates; `tw:rsp:R:cancel` a cancel request for the owner;
* `tw:req:K`       idempotency key K (tenant and caller's request id) →
  "R<TAB>fingerprint", for idempotent retries; it lives while R runs and
  `retention` after it ends.

Only what must be shared goes to Redis: a response that is resumable or has
a caller's request id. Any other (a non-resumable stream or a unary call
without a request id) stays in this process (an in-memory store), so it
keeps serving while Redis is down; nobody can retry into it or resume it on
another replica, and `Cancel` by its id works on the replica that runs it
(its caller's call, which that replica holds, ends it anyway).

A store outage never leaks: a command that cannot reach Redis within
`STORE_TIMEOUT` raises `StoreUnavailable` (UNAVAILABLE `STORE_UNAVAILABLE`,
RetryInfo, no address or exception text); the detail is logged once per
`OUTAGE_LOG_INTERVAL` at WARNING. A resumable response whose chunk cannot
be written fails with STORE_UNAVAILABLE and its last delivered sequence, and
no unwritten chunk is ever sent, so what a caller holds stays replayable.
redis-py reconnects by itself; a mirror or a response that failed on the
store is dropped from this replica at once, so the next call reads Redis
afresh, and a lease that lapsed during an outage is taken back by its owner
unless another replica took the response over.

The owner writes every chunk to the log before it sends it (the planner
awaits `durable`), batched per event-loop turn, so any chunk a caller holds
can be replayed by any replica. A replica asked for a response it does not
own mirrors it: replays the log, then follows new entries live. If the
owner's lease lapses without an end entry, the mirror takes the response
over: a deterministic backend regenerates it and the governed text already
logged is skipped (governance is split-independent, so it comes out
identical and is checked), then generation continues; any other backend ends
the response with UNAVAILABLE `RESPONSE_OWNER_LOST` and the last sequence.

Why one module: the owner's log, leases, mirrors that follow it and the
hand-over of an orphan are one protocol over one key layout (above); each
side's correctness depends on the other's exact writes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.delivery.chunks import ChunkRecord, ToolDelta
from tokenwire_server.delivery.response import LiveResponse, Outcome, State
from tokenwire_server.domain import (
    Action,
    DeliveryMode,
    DeliveryOptions,
    FinishReason,
    ModelInfo,
    Operator,
    ServingPath,
    ToolCall,
    Verdict,
)
from tokenwire_server.errors import (
    BackendUnavailable,
    RequestIdReused,
    ResponseCancelled,
    StoreUnavailable,
    TokenwireError,
)
from tokenwire_server.store.base import Attached, Orphan, ResponseStore, SerializedRequest
from tokenwire_server.store.memory import InMemoryResponseStore

log = logging.getLogger(__name__)

#: Connect and socket timeout of every store command: an outage fails a call
#: within about this long (one immediate reconnect included), never at its deadline.
STORE_TIMEOUT = 1.0
#: An ongoing outage is logged at most this often.
OUTAGE_LOG_INTERVAL = 30.0
#: What an unreachable or read-only (failing over) Redis raises.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ReadOnlyError,
    OSError,
)
UNAVAILABLE_MESSAGE = "the shared response store is unavailable; retry shortly"


def store_unavailable(response_id: str = "") -> StoreUnavailable:
    return StoreUnavailable(
        UNAVAILABLE_MESSAGE, metadata={"responseId": response_id} if response_id else None
    )


class Outage:
    """Logs a store outage once, then at most every `interval`, and its end.

    WARNING with the exception's type and text (which name the address), no
    traceback; callers only ever see `StoreUnavailable`."""

    def __init__(
        self, interval: float = OUTAGE_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.down = False
        self._interval = interval
        self._clock = clock
        self._logged_at = -math.inf
        self._unlogged = 0

    def failed(self, error: BaseException, doing: str) -> None:
        now = self._clock()
        if not self.down or now - self._logged_at >= self._interval:
            log.warning(
                "the response store is unavailable (%s while %s: %s); calls that need it "
                "fail with STORE_UNAVAILABLE%s",
                type(error).__name__,
                doing,
                error,
                f" ({self._unlogged} more failures since the last message)"
                if self._unlogged
                else "",
            )
            self._logged_at = now
            self._unlogged = 0
        else:
            self._unlogged += 1
        self.down = True

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            self._unlogged = 0
            log.info("the response store is reachable again")


#: Renews a lease for its holder, or takes back one that lapsed (an outage outlasted
#: it and nobody took the response over): 1 when held, 0 when someone else holds it.
_RENEW = """
local current = redis.call('get', KEYS[1])
if current == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if current == false then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
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
    fields: dict[str, str | int] = {
        "k": "c",
        "s": record.sequence,
        "t": record.text,
        "o": record.text_offset,
        "n": record.token_count,
        "a": _actions_json(record.actions),
        "e": record.emitted_at_ns,
    }
    if record.tool is not None:  # a tool-call fragment: which call, where in it
        fields["tool"] = json.dumps(list(record.tool))
    return fields


def _tool_delta(fields: dict[str, str]) -> ToolDelta | None:
    if "tool" not in fields:
        return None
    position, call_id, name, offset = json.loads(fields["tool"])
    return ToolDelta(int(position), str(call_id), str(name), int(offset))


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
                "checks": [base64.b64encode(c.SerializeToString()).decode() for c in o.checks],
                "checks_passed": o.checks_passed,
                "review": list(o.review) if o.review is not None else None,
                "held": o.held,
                "tool_calls": [[c.id, c.name, c.arguments] for c in o.tool_calls],
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
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._client = client
        self._response_id = response_id
        #: Told first when a write fails, so the response has failed before any
        #: waiting reader learns of it.
        self._on_failure = on_failure
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
        if self._failure is not None:  # a chunk that is not written is never sent
            raise store_unavailable(self._response_id)
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
                    if self._on_failure is not None:
                        self._on_failure(error)
                    for _, waiter in self._waiters:
                        if not waiter.done():
                            waiter.set_exception(store_unavailable(self._response_id))
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
        max_responses: int = 10_000,
        max_bytes: int = 64 << 20,
        timeout: float = STORE_TIMEOUT,
    ) -> None:
        # redis-py's types say bytes | str for everything; values are bytes here.
        # Short timeouts and one immediate retry (a pooled connection that died with
        # the server reconnects once); anything longer is an outage, reported as one.
        self._client: Any = redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._retention = retention
        self._lease = lease_seconds
        self._running_ttl = running_ttl
        #: Mirrors wait on the log with blocking reads: a longer socket timeout, own pool.
        self._block_ms = max(50, int(lease_seconds * 1000 / 3))
        self._blocking: Any = redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=self._block_ms / 1000 + timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:12]}"
        #: Responses nobody else needs (not resumable, no request id): never in Redis.
        self._here = InMemoryResponseStore(retention, max_responses, max_bytes)
        self._local: dict[str, LiveResponse] = {}
        #: Idempotency keys of the responses this replica registered, by response id.
        self._keys: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.outage = Outage()
        #: Responses whose owner died and that this replica won: the servicer asks for them.
        self._orphans: asyncio.Queue[Orphan] = asyncio.Queue()

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turns an unreachable store into `StoreUnavailable` (and one log line)."""
        try:
            yield
        except OUTAGE_ERRORS as error:
            self.outage.failed(error, doing)
            raise store_unavailable() from None
        self.outage.succeeded()

    def _forget(self, response: LiveResponse) -> None:
        """Drops a response from this replica's view (only that very object), so
        the next call for its id reads Redis afresh."""
        if self._local.get(response.response_id) is response:
            del self._local[response.response_id]

    # ----- registering (the owner) ----------------------------------------

    async def register(
        self,
        response: LiveResponse,
        idempotency_key: str | None,
        fingerprint: str,
        request: SerializedRequest,
    ) -> Attached:
        if idempotency_key is None and not response.resumable:
            # Nobody can retry into it or resume it: it needs no shared store.
            return await self._here.register(response, None, "", request)
        with self._guard("registering a response"):
            return await self._register_shared(response, idempotency_key, fingerprint, request())

    async def _register_shared(
        self, response: LiveResponse, idempotency_key: str | None, fingerprint: str, request: bytes
    ) -> Attached:
        key = None
        if idempotency_key is not None:
            key = f"tw:req:{idempotency_key}"
            value = f"{response.response_id}\t{fingerprint}"
            # The key lives while the response may run; `finished` shortens it to retention.
            ttl = int(self._running_ttl)
            if not await self._client.set(key, value, nx=True, ex=ttl):
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
                swapped = await self._client.eval(_SWAP, 1, key, _text(known or b""), value, ttl)
                if not swapped:
                    return await self._register_shared(
                        response, idempotency_key, fingerprint, request
                    )
        await self.own(response, request, key)
        return Attached(response, existing=False)

    async def own(
        self, response: LiveResponse, request: bytes | None = None, key: str | None = None
    ) -> None:
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
            on_failure=lambda error: self._log_failed(response, error),
        )
        self._local[response_id] = response
        if key is not None:
            self._keys[response_id] = key
        self._spawn(self._hold_lease(response), f"lease {response_id}")

    def _log_failed(self, response: LiveResponse, error: BaseException) -> None:
        """A chunk or the ending could not be written: the response fails here with
        STORE_UNAVAILABLE (readers get their last sent sequence) instead of going
        on unlogged. A response that already ended (a unary answer whose ending
        could not be logged) keeps its ending; its caller has it."""
        if isinstance(error, OUTAGE_ERRORS):
            self.outage.failed(error, f"writing the log of {response.response_id}")
        else:
            log.warning(
                "writing the log of %s failed (%s: %s)",
                response.response_id,
                type(error).__name__,
                error,
            )
        self._forget(response)
        response.fail(store_unavailable(response.response_id))
        response.stop_generation()

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
                except OUTAGE_ERRORS as error:
                    # Keep serving local readers and try again next turn: the log
                    # writer fails the response if a chunk cannot be written meanwhile.
                    self.outage.failed(error, f"renewing the lease of {response.response_id}")
                    continue
                self.outage.succeeded()
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
        if response.response_id in self._here:
            self._here.finished(response)
            return
        key = self._keys.pop(response.response_id, None)

        async def expire() -> None:
            with contextlib.suppress(Exception):
                pipe = self._client.pipeline(transaction=False)
                pipe.expire(_key(response.response_id, "meta"), int(self._retention))
                if key is not None:
                    pipe.expire(key, int(self._retention))
                await pipe.execute()
            await asyncio.sleep(self._retention)
            self._forget(response)

        self._spawn(expire(), f"retain {response.response_id}")

    def running_here(self) -> list[LiveResponse]:
        """Local-only responses: no other replica can take them over."""
        return self._here.running_here()

    def shared_here(self) -> list[LiveResponse]:
        """Shared responses generated or mirrored here."""
        return list(self._local.values())

    # ----- reading (any replica) -------------------------------------------

    async def get(self, response_id: str) -> LiveResponse | None:
        here = await self._here.get(response_id)
        if here is not None:
            return here
        local = self._local.get(response_id)
        if local is not None:
            return local
        with self._guard("reading a response"):
            raw = await self._client.hgetall(_key(response_id, "meta"))
            if not raw:
                return None
            entries = await self._client.xrange(_key(response_id, "log"))
        local = self._local.get(response_id)  # another call built it meanwhile
        if local is not None:
            return local
        meta = {_text(k): v for k, v in raw.items()}
        mirror = self._mirror(response_id, meta)
        mirror.on_end(self.finished)
        mirror.on_orphaned = self._orphaned
        self._local[response_id] = mirror
        last_id = "0-0"
        for entry_id, fields in entries:
            last_id = _text(entry_id)
            self._apply(mirror, _decode(fields))
        if not mirror.done:
            mirror.task = self._spawn(
                self._follow(mirror, last_id, bytes(meta["request"])), f"follow {response_id}"
            )
        return mirror

    def _orphaned(self, mirror: LiveResponse) -> None:
        """A mirror's last reader left: stop following; the owner keeps the response."""
        if not mirror.done:
            self._forget(mirror)
        if mirror.task is not None and not mirror.done:
            mirror.task.cancel()

    async def request_cancel(self, response: LiveResponse) -> None:
        """Cancel for a response this replica may only be mirroring."""
        if response.log is None and not response.done and response.response_id not in self._here:
            with self._guard("requesting a cancel"):
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
                mirror.choose_mode(DeliveryMode.BUFFERED)
        return mirror

    def _apply(self, mirror: LiveResponse, fields: dict[str, str]) -> None:
        if fields["k"] == "c":
            mirror.choose_mode(DeliveryMode.STREAM)  # the owner cut chunks: a stream
            mirror.append_logged(
                ChunkRecord(
                    sequence=int(fields["s"]),
                    text=fields["t"],
                    text_offset=int(fields["o"]),
                    token_count=int(fields["n"]),
                    actions=_actions(fields["a"]),
                    emitted_at_ns=int(fields["e"]),
                    tool=_tool_delta(fields),
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
                checks=tuple(
                    pb.VerificationCheck.FromString(base64.b64decode(c))
                    for c in o.get("checks", ())
                ),
                review=(o["review"][0], o["review"][1]) if o.get("review") else None,
                held=bool(o.get("held", False)),
                checks_passed=bool(o.get("checks_passed", True)),
                tool_calls=tuple(ToolCall(*call) for call in o.get("tool_calls", ())),
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
        try:
            while not mirror.done:
                if mirror.readers:  # tell the owner someone here still reads
                    await self._client.set(readers_key, self.replica_id, px=int(self._lease * 2000))
                answer = await self._blocking.xread(
                    {log_key: last_id}, block=self._block_ms, count=1000
                )
                self.outage.succeeded()
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
        except (redis.RedisError, OSError) as error:
            if isinstance(error, OUTAGE_ERRORS):
                self.outage.failed(error, f"following {mirror.response_id}")
            else:
                log.warning(
                    "following %s failed (%s: %s)", mirror.response_id, type(error).__name__, error
                )
            # Its readers here end with their last sequence; the next call reads afresh.
            self._forget(mirror)
            mirror.end_logged(State.FAILED, None, store_unavailable(mirror.response_id))
            if mirror.task is not asyncio.current_task():
                mirror.stop_generation()  # a takeover's generation, started before `own` failed

    async def _take_over(self, mirror: LiveResponse, request: bytes) -> None:
        log.warning("taking over response %s from a lost replica", mirror.response_id)
        self._orphans.put_nowait(Orphan(mirror, request))

    async def next_orphan(self) -> Orphan:
        return await self._orphans.get()

    async def settle_orphan(self, orphan: Orphan, continued: bool) -> None:
        mirror = orphan.response
        if continued:
            try:
                with self._guard(f"taking over {mirror.response_id}"):
                    await self.own(mirror)
            except StoreUnavailable as error:
                self._forget(mirror)
                mirror.end_logged(State.FAILED, None, error)
                mirror.stop_generation()
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
        with contextlib.suppress(redis.RedisError, OSError):
            record = RedisLog(self._client, mirror.response_id, self._running_ttl, self._retention)
            record.end(mirror)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._client.aclose()
        await self._blocking.aclose()


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
