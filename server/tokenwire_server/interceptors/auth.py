"""Authentication, first in the chain: no tenant, no call.

A caller proves who it is with `authorization: Bearer <key>` (a key from the
keys file) or, on an mTLS port, with its verified client certificate, whose
first subject alternative name becomes the tenant. Health and reflection stay
open by default (load balancers, kubelet probes and grpcurl need them);
`auth_health_and_reflection` puts them behind the same check, for a port
exposed beyond the mesh where a service listing is information. The key is
never logged.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import grpc

from tokenwire_server.auth import Authenticator
from tokenwire_server.errors import TokenwireError, abort
from tokenwire_server.interceptors.call import Call
from tokenwire_server.interceptors.chain import Context, Stage


class Unauthenticated(TokenwireError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


#: RFC 6750: the scheme, case-insensitive, then one token (no spaces inside).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([^\s]+) *")


def bearer_key(header: str) -> str | None:
    """The key of `Bearer <key>`; None for anything else (a bare key, another
    scheme, no key, a key with spaces), which is refused rather than guessed."""
    match = _BEARER.fullmatch(header)
    return match.group(1) if match else None


def _certificate_identity(context: Context) -> str | None:
    auth = context.auth_context()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth.get(key) or ():
            return bytes(value).decode()
    return None


class Credentials:
    """Who is calling: a key from the keys file, or a verified client certificate."""

    def __init__(self, authenticator: Authenticator | None, accept_certificates: bool) -> None:
        self._authenticator = authenticator
        self._accept_certificates = accept_certificates

    def tenant(self, context: Context) -> str:
        headers = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(headers) > 1:
            # Which one would win depends on the proxy in between: refuse both.
            raise Unauthenticated(
                "send one `authorization` header, not several", reason="DUPLICATE_CREDENTIALS"
            )
        if headers and self._authenticator is not None:
            key = bearer_key(str(headers[0]))
            if key is None:
                raise Unauthenticated(
                    "the `authorization` header must be `Bearer <API key>`",
                    reason="MALFORMED_CREDENTIALS",
                )
            tenant = self._authenticator.tenant_for(key)
            if tenant is None:
                raise Unauthenticated("the API key is not valid", reason="INVALID_CREDENTIALS")
            return tenant
        if self._accept_certificates:
            identity = _certificate_identity(context)
            if identity:
                return identity
        raise Unauthenticated(
            "send `authorization: Bearer <API key>`"
            + (" or a client certificate" if self._accept_certificates else ""),
            reason="MISSING_CREDENTIALS",
        )


class AuthStage(Stage):
    """RespondService: the tenant of every call, or UNAUTHENTICATED."""

    #: Runs before a malformed body is refused: strangers learn nothing, not even that.
    guards_the_edge = True

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def enter(self, call: Call, context: Context) -> None:
        call.tenant = self._credentials.tenant(context)


class OtherServicesAuth:
    """Health and reflection behind the same credentials (`auth_health_and_reflection`):
    wraps their method handlers, once, when they are registered."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def __call__(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return _guarded(handler, self._enter)

    async def _enter(self, request: Any, context: Context, details: Any) -> None:
        try:
            self._credentials.tenant(context)
        except Unauthenticated as error:
            await abort(context, error)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], enter: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """Any handler shape (health Watch writes through the context, reflection
    streams both ways) behind `enter`; streamed answers are written through
    the context so one wrapper serves generators and writers alike."""
    kinds: dict[tuple[bool, bool], tuple[Any, Any]] = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make, behavior = kinds[(handler.request_streaming, handler.response_streaming)]

    async def unary(request: Any, context: Context) -> Any:
        await enter(request, context, None)
        return await behavior(request, context)

    async def streaming(request: Any, context: Context) -> None:
        await enter(request, context, None)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            await result
            return
        async for message in result:
            await context.write(message)

    guarded: grpc.RpcMethodHandler[Any, Any] = make(
        streaming if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return guarded
