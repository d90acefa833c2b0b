"""The one wrapper every RespondService call runs through, and the stages it composes.

A stage is one concern (auth, tracing, limits, audit, verification...) written
as hooks on a call's life: `enter` before the servicer runs, `on_chunk` for
each chunk about to leave, `on_completed` before the terminal `Completed` (or
the unary answer) leaves, `on_failed` before a failing status leaves,
`on_cancelled`, and `exit`. The chain wraps each handler once, when the
service is registered, not per call; per chunk it runs one loop over the few
stages that look at chunks, with no async-generator layer per stage; and it
is the only place that turns an error into a status, so every stage has seen
a failure before the caller does. Stages enter in list order (the first is
the outermost) and see events innermost first.

Errors travel outward as exceptions: a stage or the servicer raises a
`TokenwireError` and the chain runs `on_failed` on every stage, then sends
the status. A request body that did not parse is refused here, right after
authentication, so every handler receives a typed message.

Why one module: the hook order, the ending rules and the registration are
the chain's one contract with every stage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.domain import utf8_length
from tokenwire_server.errors import InvalidRequest, TokenwireError, abort
from tokenwire_server.interceptors.call import Call, Progress, ResponseFacts
from tokenwire_server.observability.rate_limited_log import RateLimitedLog
from tokenwire_server.wire import SERVICE_NAME, Undecodable, tolerant

log = logging.getLogger("tokenwire_server.requests")
Context = grpc.aio.ServicerContext[Any, Any]
#: Methods that produce a response (`Cancel` only acts on one).
RESPONDING = frozenset({"Respond", "StreamRespond"})
EVERY_METHOD = frozenset({"Respond", "StreamRespond", "Cancel"})


class Stage:
    """One concern of the chain; override the hooks it needs."""

    #: The methods this stage takes part in.
    methods: frozenset[str] = EVERY_METHOD

    async def enter(self, call: Call, context: Context) -> None:
        """Before the servicer runs; raise a TokenwireError to refuse the call."""

    def on_facts(self, call: Call, facts: ResponseFacts) -> None:
        """The servicer reported which response the call reads."""

    async def on_first_event(self, call: Call) -> None:
        """A stream's first event is about to leave."""

    def on_chunk(self, call: Call, chunk: pb.TokenChunk) -> None:
        """A chunk is about to leave; raise a TokenwireError to stop it."""

    async def on_completed(self, call: Call, completed: pb.Completed, unary: bool) -> None:
        """`Completed` (or the unary answer holding it) is about to leave."""

    async def on_failed(self, call: Call, error: TokenwireError | None) -> None:
        """The call fails with `call.status` (error None: not one of ours)."""

    def on_cancelled(self, call: Call) -> None:
        """The caller went away or its deadline passed; nothing may be awaited."""

    def exit(self, call: Call) -> None:
        """Always last, whatever happened."""


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


class _Hooks:
    """The stages of one method, each hook list holding only the stages that use it.

    Ending hooks (`on_failed`, `on_cancelled`, `exit`) keep each stage's
    position: they run only for stages the call entered, so a call refused by
    authentication leaves no audit row and a refused quota releases no slot.
    """

    def __init__(self, stages: Sequence[Stage], method: str, before_edge: int) -> None:
        taking_part = [s for s in stages if method in s.methods]
        self.count = len(taking_part)
        self.before_edge = min(before_edge, self.count)
        positions = list(enumerate(taking_part))
        inner_first = list(reversed(positions))

        def using(hook: str, order: list[tuple[int, Stage]]) -> list[Any]:
            return [getattr(s, hook) for _, s in order if _overrides(s, hook)]

        def placed(hook: str) -> list[tuple[int, Any]]:
            return [(i, getattr(s, hook)) for i, s in inner_first if _overrides(s, hook)]

        self.enter: list[tuple[int, Callable[[Call, Context], Awaitable[None]]]] = [
            (i, s.enter) for i, s in positions if _overrides(s, "enter")
        ]
        self.facts: tuple[Callable[[Call, ResponseFacts], None], ...] = tuple(
            using("on_facts", inner_first)
        )
        self.first_event: list[Callable[[Call], Awaitable[None]]] = using(
            "on_first_event", inner_first
        )
        self.chunk: list[Callable[[Call, pb.TokenChunk], None]] = using("on_chunk", inner_first)
        self.completed: list[Callable[[Call, pb.Completed, bool], Awaitable[None]]] = using(
            "on_completed", inner_first
        )
        self.failed: list[tuple[int, Callable[[Call, TokenwireError | None], Awaitable[None]]]] = (
            placed("on_failed")
        )
        self.cancelled: list[tuple[int, Callable[[Call], None]]] = placed("on_cancelled")
        self.exit: list[tuple[int, Callable[[Call], None]]] = placed("exit")


async def _settle(call: Call) -> None:
    """Waits for the work the call overlapped; its first error is the call's."""
    while call.overlapped:
        await call.overlapped.pop(0)


async def _settled_quietly(call: Call) -> None:
    """The same, on a call that already fails: its own error stands."""
    overlapped, call.overlapped = call.overlapped, []
    if overlapped:
        await asyncio.gather(*overlapped, return_exceptions=True)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _progress(completed: pb.Completed) -> Progress:
    return Progress(completed.last_sequence, completed.usage.completion_tokens)


UnaryServicerMethod = Callable[[Any, Context, Call], Awaitable[Any]]
StreamServicerMethod = Callable[[Any, Context, Call], AsyncIterator[Any]]


class Chain:
    """Wraps RespondService's servicer methods in the stages, once per method."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        self._malformed_log = RateLimitedLog(log)
        #: Stages that must run before a malformed body is refused (authentication).
        self._before_edge = sum(1 for s in self.stages if getattr(s, "guards_the_edge", False))

    def _call(self, method: str, request: Any, context: Context, hooks: _Hooks) -> Call:
        return Call(
            method=method,
            request=request,
            metadata=tuple(context.invocation_metadata() or ()),
            listeners=hooks.facts,
        )

    async def _enter(self, call: Call, context: Context, hooks: _Hooks) -> None:
        """Stages in order; `call.entered` counts the stages the call got past."""
        edge = hooks.before_edge
        for position, enter in hooks.enter:
            if edge <= position:
                call.entered = edge
                self._refuse_undecodable(call)
                edge = hooks.count
            call.entered = position
            await enter(call, context)
        call.entered = edge
        self._refuse_undecodable(call)
        call.entered = hooks.count

    def _refuse_undecodable(self, call: Call) -> None:
        request = call.request
        if isinstance(request, Undecodable):
            self._malformed_log.log(
                logging.WARNING,
                f"malformed:{call.method}",
                "malformed request to %s refused: %s",
                call.method,
                request.reason[:200],
            )
            raise InvalidRequest(
                f"the request body is not a valid {request.message_type}: {request.reason}",
                reason="MALFORMED_REQUEST",
            )

    async def _fail(
        self, call: Call, context: Context, hooks: _Hooks, error: TokenwireError
    ) -> None:
        await _settled_quietly(call)
        call.status = error.code.name
        for position, failed in hooks.failed:
            if position < call.entered:
                await failed(call, error)
        await abort(context, error, error.trailers)

    async def _crashed(self, call: Call, context: Context, hooks: _Hooks) -> None:
        """A bug, not a refusal: recorded like any failure, then grpc's UNKNOWN."""
        await _settled_quietly(call)
        code = context.code()
        call.status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        for position, failed in hooks.failed:
            if position < call.entered:
                await failed(call, None)

    def _cancelled(self, call: Call, hooks: _Hooks) -> None:
        call.status = "CANCELLED"
        for overlapped in call.overlapped:  # nobody awaits them now
            overlapped.add_done_callback(_retrieve)
        for position, cancelled in hooks.cancelled:
            if position < call.entered:
                cancelled(call)

    def unary(self, method: str, behavior: UnaryServicerMethod) -> Any:
        hooks = _Hooks(self.stages, method, self._before_edge)

        async def handle(request: Any, context: Context) -> Any:
            call = self._call(method, request, context, hooks)
            try:
                await self._enter(call, context, hooks)
                response = await behavior(request, context, call)
                await _settle(call)
                if isinstance(response, pb.RespondResponse):
                    call.progress = _progress(response.completed)
                    for completed in hooks.completed:
                        await completed(call, response.completed, True)
                call.status = "OK"
                return response
            except TokenwireError as error:
                await self._fail(call, context, hooks, error)
            except asyncio.CancelledError:
                self._cancelled(call, hooks)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                await self._crashed(call, context, hooks)
                raise
            finally:
                for position, leave in hooks.exit:
                    if position < call.entered:
                        leave(call)

        return handle

    def stream(self, method: str, behavior: StreamServicerMethod) -> Any:
        hooks = _Hooks(self.stages, method, self._before_edge)

        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            call = self._call(method, request, context, hooks)
            sent = call.sent
            first = True
            try:
                await self._enter(call, context, hooks)
                async with aclosing(behavior(request, context, call)) as events:  # type: ignore[type-var]
                    async for event in events:
                        if first:
                            first = False
                            await _settle(call)
                            for first_event in hooks.first_event:
                                await first_event(call)
                        kind = event.WhichOneof("event")
                        if kind == "chunk":
                            chunk = event.chunk
                            for check in hooks.chunk:
                                check(call, chunk)
                            sent.chunks += 1
                            if sent.first_offset < 0:
                                sent.first_offset = chunk.text_offset
                            sent.end_offset = chunk.text_offset + utf8_length(chunk.text)
                        elif kind == "completed":
                            call.progress = _progress(event.completed)
                            for completed in hooks.completed:
                                await completed(call, event.completed, False)
                            call.status = "OK"
                        else:
                            sent.heartbeats += 1
                        yield event
            except TokenwireError as error:
                if not call.status:
                    await self._fail(call, context, hooks, error)
                else:  # after Completed: already recorded as completed; refuse the rest
                    await abort(context, error, error.trailers)
            except (asyncio.CancelledError, GeneratorExit):
                if not call.status:
                    self._cancelled(call, hooks)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                if not call.status:
                    await self._crashed(call, context, hooks)
                raise
            finally:
                for position, leave in hooks.exit:
                    if position < call.entered:
                        leave(call)

        return handle

    def register(self, servicer: Any, server: grpc.aio.Server) -> None:
        """Serves RespondService: `servicer` has `respond`, `stream_respond` and
        `cancel`, each taking the call too; each is wrapped once, here."""
        handlers = {
            "Respond": grpc.unary_unary_rpc_method_handler(
                self.unary("Respond", servicer.respond),
                request_deserializer=tolerant(pb.RespondRequest),
                response_serializer=pb.RespondResponse.SerializeToString,
            ),
            "StreamRespond": grpc.unary_stream_rpc_method_handler(
                self.stream("StreamRespond", servicer.stream_respond),
                request_deserializer=tolerant(pb.StreamRespondRequest),
                response_serializer=pb.StreamRespondResponse.SerializeToString,
            ),
            "Cancel": grpc.unary_unary_rpc_method_handler(
                self.unary("Cancel", servicer.cancel),
                request_deserializer=tolerant(pb.CancelRequest),
                response_serializer=pb.CancelResponse.SerializeToString,
            ),
        }
        generic = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
        server.add_generic_rpc_handlers((generic,))
