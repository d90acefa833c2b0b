"""The base every tokenwire interceptor shares: wrap RespondService handlers only.

grpc.aio interceptors see a handler, not a call, so acting on a call means
rebuilding the handler around a wrapped behaviour; that plumbing lives here
once. Health and reflection pass through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
import wrapt

from tokenwire.v1 import respond_pb2

SERVICE_NAME: str = respond_pb2.DESCRIPTOR.services_by_name["RespondService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncGenerator[Any, None]]


def method_name(details: grpc.HandlerCallDetails) -> str:
    """`Respond` from `/tokenwire.v1.RespondService/Respond`."""
    method: str = details.method
    return method.rsplit("/", 1)[-1]


def status_name(context: Context) -> str:
    """The status a call ended with, as its enum name (UNKNOWN when none was set)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def is_respond_service(details: grpc.HandlerCallDetails) -> bool:
    method: str = details.method
    return method.startswith(SERVICE_PREFIX)


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """Wraps unary-unary and unary-stream handlers; others pass through unchanged."""
    if handler is None or handler.request_streaming:
        return handler
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        unary(handler.unary_unary),  # type: ignore[arg-type]
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RespondServiceInterceptor(grpc.aio.ServerInterceptor):
    """Intercepts RespondService calls; override `enter`, or the wrappers for more."""

    #: Method names to intercept; None means all of RespondService.
    methods: frozenset[str] | None = None

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if not is_respond_service(handler_call_details):
            return handler
        if self.methods is not None and method_name(handler_call_details) not in self.methods:
            return handler
        return wrap_handler(
            handler,
            lambda behavior: self.wrap_unary(behavior, handler_call_details),
            lambda behavior: self.wrap_stream(behavior, handler_call_details),
        )

    async def enter(self, request: Any, context: Context, details: grpc.HandlerCallDetails) -> None:
        """Runs in the call's own task before the handler; context variables set here reach it."""

    def wrap_unary(
        self, behavior: UnaryBehavior, details: grpc.HandlerCallDetails
    ) -> UnaryBehavior:
        async def entered(request: Any, context: Context) -> Any:
            await self.enter(request, context, details)
            return await behavior(request, context)

        return entered

    def wrap_stream(
        self, behavior: StreamBehavior, details: grpc.HandlerCallDetails
    ) -> StreamBehavior:
        async def entered(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            await self.enter(request, context, details)
            async with aclosing(behavior(request, context)) as stream:
                async for event in stream:
                    yield event

        return entered


_ContextProxy: Any = wrapt.ObjectProxy  # generic in wrapt's stubs, not at runtime


class AbortHook(_ContextProxy):  # type: ignore[misc]
    """A servicer context that runs `before` just before the call's status is sent.

    grpc.aio sends the status the moment `abort` is called, before the
    handlers unwind; an interceptor that must record a failure before the
    caller can see it (audit, metrics, logs) hooks here. `fired` tells the
    interceptor's own exception path that the failure is already recorded.
    """

    def __init__(
        self, context: Context, before: Callable[[grpc.StatusCode], Awaitable[None]]
    ) -> None:
        super().__init__(context)
        self._self_before = before
        self._self_fired = False

    @property
    def fired(self) -> bool:
        return bool(self._self_fired)

    @property
    def context(self) -> Context:
        """This proxy, typed as the context it stands in for."""
        context: Context = self
        return context

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        if not self._self_fired:
            self._self_fired = True
            await self._self_before(code)
        await self.__wrapped__.abort(code, details, trailing_metadata)
