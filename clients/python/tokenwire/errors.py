"""Typed errors for tokenwire callers, mapped from gRPC status and google.rpc details.

Callers branch on the class (the gRPC code) and on `reason` (the stable
ErrorInfo reason); `last_sequence` tells a streaming caller what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
LAST_SEQUENCE_KEY = "tokenwire-last-sequence"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class TokenwireError(Exception):
    """Base class: `code` is the gRPC status code, `reason` the ErrorInfo reason."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
        last_sequence: int | None = None,
        trailers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = field_violations
        self.retry_delay = retry_delay
        self.last_sequence = last_sequence
        self.trailers = trailers or {}

    def __str__(self) -> str:
        name = self.code.name if self.code else "UNKNOWN"
        reason = f" {self.reason}" if self.reason else ""
        return f"{name}{reason}: {self.message}"


class InvalidArgument(TokenwireError): ...


class NotFound(TokenwireError): ...


class AlreadyExists(TokenwireError): ...


class OutOfRange(TokenwireError): ...


class FailedPrecondition(TokenwireError): ...


class ResourceExhausted(TokenwireError): ...


class Unauthenticated(TokenwireError): ...


class PermissionDenied(TokenwireError): ...


class DeadlineExceeded(TokenwireError): ...


class Cancelled(TokenwireError): ...


class Unavailable(TokenwireError): ...


class Unimplemented(TokenwireError): ...


class Internal(TokenwireError): ...


class DataLoss(TokenwireError): ...


class ProtocolError(TokenwireError):
    """The stream broke the tokenwire contract (gap, bad offset, event after Completed)."""


class IntegrityError(ProtocolError):
    """What was received does not hash to what the server says it sent."""


_BY_CODE: dict[grpc.StatusCode, type[TokenwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}


def from_status(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
) -> TokenwireError:
    """Builds the typed error from a call's code, message and trailers."""
    trailers: dict[str, str] = {}
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations.extend(
                        FieldViolation(v.field, v.description) for v in bad.field_violations
                    )
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
        elif isinstance(value, str):
            trailers[key] = value
    last = trailers.get(LAST_SEQUENCE_KEY, metadata.get("lastSequence"))
    cls = _BY_CODE.get(code, TokenwireError)
    return cls(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
        retry_delay=retry_delay,
        last_sequence=int(last) if last is not None and last.isdigit() else None,
        trailers=trailers,
    )


def from_rpc_error(error: grpc.RpcError) -> TokenwireError:
    """Maps a sync or asyncio grpc error to the typed hierarchy."""
    call: grpc.Call = error  # type: ignore[assignment]
    return from_status(call.code(), call.details() or "", call.trailing_metadata())
