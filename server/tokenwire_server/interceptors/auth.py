"""Authentication, first in the chain: no tenant, no call.

A caller proves who it is with `authorization: Bearer <key>` (a key from the
keys file) or, on an mTLS port, with its verified client certificate, whose
first subject alternative name becomes the tenant. Health and reflection stay
open (load balancers and grpcurl need them). The key is never logged.
"""

from __future__ import annotations

from typing import Any

import grpc

from tokenwire_server.auth import Authenticator
from tokenwire_server.call_context import CALL_TENANT
from tokenwire_server.errors import TokenwireError, abort
from tokenwire_server.interceptors._wrap import Context, RespondServiceInterceptor


class Unauthenticated(TokenwireError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


def _certificate_identity(context: Context) -> str | None:
    auth = context.auth_context()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth.get(key) or ():
            return bytes(value).decode()
    return None


class AuthInterceptor(RespondServiceInterceptor):
    def __init__(self, authenticator: Authenticator | None, accept_certificates: bool) -> None:
        self._authenticator = authenticator
        self._accept_certificates = accept_certificates

    def _tenant(self, context: Context) -> str:
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        if header and self._authenticator is not None:
            scheme, _, key = header.partition(" ")
            key = key.strip() if scheme.lower() == "bearer" else header.strip()
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

    async def enter(self, request: Any, context: Context, details: grpc.HandlerCallDetails) -> None:
        try:
            CALL_TENANT.set(self._tenant(context))
        except Unauthenticated as error:
            await abort(context, error)
