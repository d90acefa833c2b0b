"""Registers RespondService with request parsing that cannot crash a call.

The generated registration parses requests with `FromString`; a malformed
body (truncated protobuf, invalid UTF-8 in a string) then fails inside gRPC
as INTERNAL. Here such a body becomes an `Undecodable` request, which the
servicer answers with INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import grpc
from google.protobuf.message import DecodeError, Message

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.interceptors._wrap import SERVICE_NAME


class Undecodable:
    """A request body that is not a valid message; carries no caller data."""

    request_id = ""
    model = ""
    labels: ClassVar[Mapping[str, str]] = MappingProxyType({})
    omit_final_text = False

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason


def tolerant(message_type: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as error:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(error))

    return parse


def add_respond_service(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = {
        "Respond": grpc.unary_unary_rpc_method_handler(
            servicer.Respond,
            request_deserializer=tolerant(pb.RespondRequest),
            response_serializer=pb.RespondResponse.SerializeToString,
        ),
        "StreamRespond": grpc.unary_stream_rpc_method_handler(
            servicer.StreamRespond,
            request_deserializer=tolerant(pb.StreamRespondRequest),
            response_serializer=pb.StreamRespondResponse.SerializeToString,
        ),
        "Cancel": grpc.unary_unary_rpc_method_handler(
            servicer.Cancel,
            request_deserializer=tolerant(pb.CancelRequest),
            response_serializer=pb.CancelResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
