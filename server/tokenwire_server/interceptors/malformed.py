"""A request body that does not parse is INVALID_ARGUMENT, for every service.

RespondService parses its requests tolerantly (wire.py) and refuses them at
the chain's edge. The other services on the port (health, reflection) are
registered by grpcio with plain `FromString`: a malformed body there fails
inside grpc as UNKNOWN and grpc logs an ERROR with a full traceback, on
every call: a log flood anyone who can reach the port can cause. Here their
parsing is made tolerant too; a malformed request is refused with
INVALID_ARGUMENT (ErrorInfo MALFORMED_REQUEST) and one rate-limited WARNING
without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from tokenwire_server.errors import InvalidRequest, abort
from tokenwire_server.interceptors.chain import Context
from tokenwire_server.observability.rate_limited_log import RateLimitedLog
from tokenwire_server.wire import Undecodable

log = logging.getLogger("tokenwire_server.requests")


class TolerantParsing:
    """Wraps one service's method handlers, once, when they are registered."""

    def __init__(self) -> None:
        self._log = RateLimitedLog(log)

    def __call__(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.request_deserializer is None or handler.request_streaming:
            return handler  # reflection streams requests: see GrpcNoiseFilter
        return self._tolerant(handler, method)

    async def _refuse(self, context: Context, method: str, request: Undecodable) -> None:
        self._log.log(
            logging.WARNING,
            f"malformed:{method}",
            "malformed request to %s refused: %s",
            method,
            request.reason[:200],
        )
        await abort(
            context,
            InvalidRequest(
                f"the request body is not a valid {request.message_type}",
                reason="MALFORMED_REQUEST",
            ),
        )

    def _tolerant(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        parse = handler.request_deserializer
        assert parse is not None
        name = method.rsplit("/", 1)[-1]

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # DecodeError, UnicodeDecodeError...
                return Undecodable(name, f"{type(error).__name__}: {error}")

        refuse = self._refuse

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if handler.response_streaming:

                async def unary_stream(request: Any, context: Context) -> Any:
                    if isinstance(request, Undecodable):
                        await refuse(context, method, request)
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async for message in result:
                            await context.write(message)
                    else:
                        await result

                return unary_stream

            async def unary_unary(request: Any, context: Context) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(context, method, request)
                return await behavior(request, context)

            return unary_unary

        make, behavior = (
            (grpc.unary_stream_rpc_method_handler, handler.unary_stream)
            if handler.response_streaming
            else (grpc.unary_unary_rpc_method_handler, handler.unary_unary)
        )
        assert behavior is not None
        wrapped: grpc.RpcMethodHandler[Any, Any] = make(
            wrap(behavior),
            request_deserializer=tolerant,
            response_serializer=handler.response_serializer,
        )
        return wrapped
