"""Registers the services beside RespondService with their handlers wrapped once.

Health, reflection and the review service need two guards RespondService's
chain gives its own calls: tolerant parsing (a malformed body is
INVALID_ARGUMENT, not a grpc traceback) and, with
`auth_health_and_reflection`, the caller's credentials. As grpc.aio server
interceptors these ran on every call of every service, RespondService's
included, where they only looked and passed: 30-50 us of CPU per call (a
bare unary server: 0.65 -> 0.70 ms per call with one pass-through
interceptor). Wrapping the other services' handlers where they are
registered costs those calls what it did and RespondService's nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import grpc


class HandlerGuard(Protocol):
    """Wraps one method handler; gets the method's full name (`/package.Service/Method`)."""

    def __call__(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]: ...


class ServiceRegistry(Protocol):
    """Where a service registers itself: a grpc.aio server, or a `GuardedRegistrar`."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None: ...


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A service's generic handler whose method handlers come out guarded."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: HandlerGuard) -> None:
        self._inner = inner
        self._guard = guard
        #: Only this service's own methods: every unknown path anyone sends is
        #: asked here too, and must not grow the dict.
        self._guarded: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = str(handler_call_details.method)
        guarded = self._guarded.get(method)
        if guarded is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            guarded = self._guarded[method] = self._guard(handler, method)
        return guarded


class GuardedRegistrar:
    """Stands in for the server where a service registers itself (the generated
    `add_*Servicer_to_server` functions call exactly these two methods)."""

    def __init__(self, server: grpc.aio.Server, guards: Sequence[HandlerGuard]) -> None:
        self._server = server
        self._guards = tuple(guards)

    def _guard(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        for guard in self._guards:  # the first listed is the innermost
            handler = guard(handler, method)
        return handler

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGeneric(handler, self._guard) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: self._guard(handler, f"/{service}/{name}")
                for name, handler in handlers.items()
            },
        )
