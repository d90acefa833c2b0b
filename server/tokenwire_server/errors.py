"""Errors the service reports, and their google.rpc form.

Every error leaves the server as a gRPC status whose details hold exactly one
`ErrorInfo` (stable UPPER_SNAKE reason, the tokenwire domain, lowerCamel
metadata) plus `BadRequest` or `RetryInfo` where they help the caller decide
what to do next. Raising one of these anywhere in the pipeline is enough: the
servicer turns it into the status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tokenwire_server.governance.scrub import scrub

ERROR_DOMAIN = "tokenwire.dev"
LAST_SEQUENCE_KEY = "tokenwire-last-sequence"
PROMPT_TOKENS_KEY = "tokenwire-prompt-tokens"
COMPLETION_TOKENS_KEY = "tokenwire-completion-tokens"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    subject: str
    description: str


class TokenwireError(Exception):
    """Base of every error with a defined gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    retry_after: float | None = None
    #: Trailing metadata sent with the status besides its details (last sequence...).
    trailers: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
        quota: Sequence[QuotaViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.quota = tuple(quota)
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidRequest(TokenwireError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class NotFound(TokenwireError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class QuotaExceeded(TokenwireError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"
    retry_after = 1.0


class ResponseNotFound(TokenwireError):
    """Unknown, expired, or (with tenants) someone else's: the same answer, so ids leak nothing."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "RESPONSE_NOT_FOUND"


class SequenceOutOfRange(TokenwireError):
    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "SEQUENCE_OUT_OF_RANGE"


class RequestIdReused(TokenwireError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "REQUEST_ID_REUSED"


class Unimplemented(TokenwireError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class BackendUnavailable(TokenwireError):
    """The backend failed; a retry (or a resume) may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"
    retry_after = 1.0


class AuditUnavailable(TokenwireError):
    """The audit row of this call could not be committed, so the call releases
    nothing more. The message names no file and no cause (the server logs them)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "AUDIT_UNAVAILABLE"
    retry_after = 1.0

    def __init__(
        self,
        message: str = "the audit trail cannot be written; nothing more is released",
        **details: Any,
    ) -> None:
        super().__init__(message, **details)


class StoreUnavailable(TokenwireError):
    """The shared response store (Redis) cannot be reached. The message never names
    the store's address or the underlying exception; the server logs those."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"
    retry_after = 1.0


class ServerStopping(TokenwireError):
    """This replica stopped before the response ended; the response lives on in
    the shared store, so the caller resumes it on another replica."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SERVER_STOPPING"
    retry_after = 0.1


class BackendStalled(TokenwireError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_STALLED"
    retry_after = 1.0


class DeadlineExceeded(TokenwireError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ResponseCancelled(TokenwireError):
    """Generation was stopped before the response finished (e.g. the server is stopping)."""

    code = grpc.StatusCode.CANCELLED
    reason = "RESPONSE_CANCELLED"


class InternalError(TokenwireError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class VerificationFailed(TokenwireError):
    """The verification gate caught the pipeline breaking its own contract."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "VERIFICATION_FAILED"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


#: Errors echo caller input (a model name, a response id, a label key); clipped, so a
#: hostile value can never push the trailers past gRPC's 8 KiB metadata limit.
MAX_MESSAGE_CHARS = 200
MAX_DETAIL_CHARS = 96
MAX_VIOLATIONS = 5


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_message(text: str) -> str:
    """Scrubbed, ASCII (non-ASCII escaped) and short: grpc-message is
    percent-encoded on the wire. Scrubbed before clipping, so a value the clip
    would cut is still recognised whole."""
    text = scrub(text[: MAX_MESSAGE_CHARS * 2])  # bounded work; a cut value is still caught
    return clip(text.encode("ascii", "backslashreplace").decode("ascii"), MAX_MESSAGE_CHARS)


def _detail(key: str, value: str) -> str:
    """Ids and counts the server made stay exact (clients resume by them);
    everything else may quote caller or upstream text and is scrubbed."""
    if key.endswith(("Id", "Sequence", "Tokens", "Seconds")):
        return clip(value)
    return clip(scrub(value[: MAX_DETAIL_CHARS * 2]))


def to_status_proto(error: TokenwireError) -> status_pb2.Status:
    """Builds the google.rpc.Status that travels in the grpc-status-details-bin trailer."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason,
                domain=ERROR_DOMAIN,
                metadata={clip(k, 32): _detail(k, v) for k, v in list(error.metadata.items())[:8]},
            )
        )
    ]
    if error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=clip(scrub(v.field[:128]), 64),  # a label key is caller text
                            description=clip(scrub(v.description[: MAX_DETAIL_CHARS * 2])),
                        )
                        for v in error.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        )
    if error.quota:
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=q.subject, description=q.description
                        )
                        for q in error.quota
                    ]
                )
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code_value: int = error.code.value[0]
    assert code_value in code_pb2.Code.values()
    return status_pb2.Status(code=code_value, message=clip_message(error.message), details=details)


def trailing_metadata(
    error: TokenwireError, extra: Sequence[tuple[str, str]] = ()
) -> tuple[tuple[str, str | bytes], ...]:
    """Trailers for a failed call: the status details, then any tokenwire keys."""
    return ((STATUS_DETAILS_KEY, to_status_proto(error).SerializeToString()), *extra)


async def abort(
    context: grpc.aio.ServicerContext[object, object],
    error: TokenwireError,
    extra_trailers: Sequence[tuple[str, str]] = (),
) -> None:
    """Ends the call with the error's status; never returns normally."""
    await context.abort(
        error.code, clip_message(error.message), trailing_metadata(error, extra_trailers)
    )
