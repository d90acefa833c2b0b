"""Who calls ReviewService, and what of a review they may see.

The caller's tenant comes from the same credentials as for RespondService
(`Bearer <key>` from the keys file, or a verified client certificate), with
the same refusals (UNAUTHENTICATED: missing, malformed, duplicate or invalid
credentials). A key whose entry has the reviewer role is a reviewer for its
tenant; nothing in a request can make a caller a reviewer or change whose
reviews it sees. A server without authentication has one tenant, "", and no
reviewers: its held responses can be read and watched, not decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from tokenwire_server.auth import REVIEWER, Authenticator
from tokenwire_server.interceptors.auth import Credentials, bearer_key
from tokenwire_server.review.model import Reviewer

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    #: Set when the caller's key has the reviewer role (for `tenant`).
    reviewer: Reviewer | None = None


class ReviewAccess:
    def __init__(self, authenticator: Authenticator | None, accept_certificates: bool) -> None:
        self._authenticator = authenticator
        self._credentials = (
            Credentials(authenticator, accept_certificates)
            if authenticator is not None or accept_certificates
            else None
        )

    def caller(self, context: Context) -> Caller:
        """The caller, or `Unauthenticated` (a TokenwireError) exactly as RespondService."""
        if self._credentials is None:
            return Caller("")
        tenant = self._credentials.tenant(context)
        if self._authenticator is None:
            return Caller(tenant)
        headers = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        key = bearer_key(str(headers[0])) if len(headers) == 1 else None
        entry = self._authenticator.identify(key) if key is not None else None
        if entry is None or entry.tenant != tenant or REVIEWER not in entry.roles:
            return Caller(tenant)
        return Caller(tenant, Reviewer(tenant, entry.label))
