"""Rebuilds a method handler around a wrapped behaviour (one helper for every interceptor)."""

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
