"""The base every tokenwire interceptor shares: wrap RespondService handlers only.

grpc.aio interceptors see a handler, not a call, so acting on a call means
rebuilding the handler around a wrapped behaviour; that plumbing lives here
once. Health and reflection pass through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tokenwire.v1 import respond_pb2

SERVICE_NAME: str = respond_pb2.DESCRIPTOR.services_by_name["RespondService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


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

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if not is_respond_service(handler_call_details):
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
        async def entered(request: Any, context: Context) -> AsyncIterator[Any]:
            await self.enter(request, context, details)
            async for event in behavior(request, context):
                yield event

        return entered
