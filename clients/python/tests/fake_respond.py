"""An in-process RespondService built from the generated stubs, sending what a
test scripts: the client's tests need nothing of tokenwire_server.

A script is a function (request, context) -> iterable of StreamRespondResponse;
it may sleep, or end the call with `fail` (a gRPC status, with tokenwire's
ErrorInfo when given a reason) like a server or a proxy would.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

RESPONSE_ID = "rsp_fake"
Script = Callable[
    [pb.StreamRespondRequest, grpc.ServicerContext], Iterable[pb.StreamRespondResponse]
]


def chunk(
    sequence: int, text: str, offset: int, response_id: str = RESPONSE_ID
) -> pb.StreamRespondResponse:
    return pb.StreamRespondResponse(
        chunk=pb.TokenChunk(
            response_id=response_id,
            sequence=sequence,
            text=text,
            text_offset=offset,
            token_count=1,
        )
    )


def chunks(
    parts: list[str], first: int = 1, response_id: str = RESPONSE_ID
) -> list[pb.StreamRespondResponse]:
    """Chunks `first`, `first + 1`, ... of an answer made of `parts`, with right offsets."""
    events = []
    offset = 0
    for index, text in enumerate(parts, start=1):
        if index >= first:
            events.append(chunk(index, text, offset, response_id))
        offset += len(text.encode())
    return events


def completed(
    parts: list[str], response_id: str = RESPONSE_ID, **fields: Any
) -> pb.StreamRespondResponse:
    text = "".join(parts)
    message = pb.Completed(
        response_id=response_id,
        final_text=text,
        final_sha256=hashlib.sha256(text.encode()).hexdigest(),
        last_sequence=len(parts),
        chunk_count=len(parts),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        finish_reason=pb.FINISH_REASON_STOP,
        verdict=pb.VERDICT_ALLOWED,
        verification=pb.Verification(status=pb.VERIFICATION_STATUS_VERIFIED),
    )
    for name, value in fields.items():
        setattr(message, name, value)
    return pb.StreamRespondResponse(completed=message)


def answer(parts: list[str], first: int = 1) -> list[pb.StreamRespondResponse]:
    return [*chunks(parts, first), completed(parts)]


def fail(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: dict[str, str] | None = None,
) -> None:
    """Ends the call with `code`; with a `reason`, tokenwire's ErrorInfo as the details."""
    if reason:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ErrorInfo(reason=reason, domain="tokenwire.dev", metadata=metadata)
        )
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(code, message)


class FakeRespond(respond_pb2_grpc.RespondServiceServicer):
    def __init__(self) -> None:
        self.script: Script = lambda request, context: answer(["hello ", "world"])
        self.requests: list[pb.StreamRespondRequest] = []
        #: Answers unary Respond when set (else: the last message's text, verified).
        self.unary: Callable[[pb.RespondRequest], pb.RespondResponse] | None = None
        self.unary_requests: list[pb.RespondRequest] = []
        self.cancelled: list[str] = []
        self._lock = threading.Lock()

    def StreamRespond(
        self, request: pb.StreamRespondRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamRespondResponse]:
        with self._lock:
            self.requests.append(request)
        yield from self.script(request, context)

    def Respond(
        self, request: pb.RespondRequest, context: grpc.ServicerContext
    ) -> pb.RespondResponse:
        self.unary_requests.append(request)
        if self.unary is not None:
            return self.unary(request)
        text = request.messages[-1].content
        events = answer([text])
        return pb.RespondResponse(completed=events[-1].completed)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        self.cancelled.append(request.response_id)
        return pb.CancelResponse(response_id=request.response_id, was_running=True)


class FakeServer:
    """A real gRPC server on 127.0.0.1 (any free port) serving `FakeRespond`."""

    def __init__(self) -> None:
        self.servicer = FakeRespond()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8))
        respond_pb2_grpc.add_RespondServiceServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    @property
    def script(self) -> Script:
        return self.servicer.script

    @script.setter
    def script(self, script: Script) -> None:
        self.servicer.script = script

    def stop(self) -> None:
        self._server.stop(grace=0).wait()


def free_port() -> int:
    """A loopback port nothing listens on (for an address that refuses connections)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
