"""Human review of escalated responses (issue 21).

`model.py` the review and its states, `store.py` the store interface and the
SQLite default, `redis_store.py` the shared store for replicas, `desk.py`
opening, deciding, expiring and watching (audit rows and metrics),
`access.py` who is calling, `service.py` the gRPC ReviewService.
`open_review_desk` builds the desk a server uses: reviews live where
responses live (Redis with a redis:// response store, else SQLite).
docs/validation-and-review.md describes the whole feature.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tokenwire_server.audit.store import AuditStore
from tokenwire_server.observability.metrics import Metrics
from tokenwire_server.reload import LoadError
from tokenwire_server.review.desk import ReviewDesk
from tokenwire_server.review.redis_store import RedisReviewStore
from tokenwire_server.review.store import ReviewStore, SqliteReviewStore


def review_path_beside(audit_path: str) -> str:
    """The default review file: next to the audit file (`:memory:` with it)."""
    if audit_path in ("", ":memory:"):
        return ":memory:"
    path = Path(audit_path)
    return str(path.with_name(f"{path.stem}.reviews.sqlite3"))


def open_review_store(response_store: str, review_path: str, audit_path: str) -> ReviewStore:
    """Redis when responses are shared through it; else the SQLite file
    `review_path` (empty: beside the audit file). A file that cannot be used is
    a LoadError of one line, like the audit file."""
    if response_store != "memory":
        return RedisReviewStore(response_store)
    path = review_path or review_path_beside(audit_path)
    try:
        return SqliteReviewStore(path)
    except (sqlite3.Error, OSError) as error:
        raise LoadError(f"review_path: {path}: {error}") from None


def open_review_desk(
    response_store: str,
    review_path: str,
    audit_path: str,
    audit: AuditStore,
    metrics: Metrics,
) -> ReviewDesk:
    return ReviewDesk(open_review_store(response_store, review_path, audit_path), audit, metrics)
