"""The registrar that guards the services beside RespondService.

Health, reflection and reviews register through it; their handlers come out
wrapped by every guard (tolerance and credentials are tested through the
server in test_health_and_reflection.py and test_auth.py). Here: what it
remembers stays bounded by the services' own methods, whatever paths callers
make up.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from tokenwire_server.interceptors.other_services import GuardedRegistrar


class RecordingServer:
    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered[service] = handlers


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_made_up_paths_leave_nothing_behind() -> None:
    seen: list[str] = []

    def guard(handler: Any, method: str) -> Any:
        seen.append(method)
        return handler

    server = RecordingServer()
    health_pb2_grpc.add_HealthServicer_to_server(
        health.aio.HealthServicer(),
        GuardedRegistrar(server, [guard]),  # type: ignore[arg-type]
    )
    (generic,) = server.generic
    known = "/grpc.health.v1.Health/Check"
    assert sorted(server.registered["grpc.health.v1.Health"]) == ["Check", "List", "Watch"]
    seen.clear()
    first = generic.service(Details(known))
    assert first is not None and generic.service(Details(known)) is first  # wrapped once
    for _ in range(1000):
        assert generic.service(Details(f"/x.Y/{uuid.uuid4().hex * 30}")) is None
    assert seen == [known]
    assert list(vars(generic)["_guarded"]) == [known]
