"""RespondService on the wire: its name, and request parsing that cannot crash a call.

The generated registration parses requests with `FromString`; a malformed
body (truncated protobuf, invalid UTF-8 in a string) then fails inside gRPC
as INTERNAL. Here such a body becomes an `Undecodable` stand-in that never
gets past the chain's edge (INVALID_ARGUMENT, interceptors/chain.py), so
the servicer's methods only ever see typed messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from google.protobuf.message import DecodeError, Message

from tokenwire.v1 import respond_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RespondService"].full_name


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
