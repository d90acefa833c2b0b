"""The audit rows of human review: `escalated` and `reviewed` events.

They go through the same `AuditStore.record` as every other row, so they are
hash-chained with the responses' rows and `tokenwire audit show RESPONSE_ID`
prints a response's escalation and decision with the rest of its history.
The columns mean what they mean for responses; what is particular to review
sits in `actions` (one entry), never the text itself:

- `escalated`: the review was opened. `verdict` is the response's governance
  verdict; `final_sha256` the SHA-256 of the governed text held or released;
  `actions[0]`: `review_id`, `held`, `rules` (the escalation rule ids),
  `expires_at_ns`.
- `reviewed`: a decision or an expiry. `status` is `OK`, or `ABORTED` with
  `error_reason` `REVIEW_ALREADY_DECIDED` when another decision took effect
  first (a decision's row is committed before the decision takes effect);
  `verdict` is the review's new state (`approved`, `rejected`, `edited`,
  `expired`); `final_sha256` the SHA-256 of the decided payload ("" when
  nothing is released); `actions[0]`: `review_id`, `held`, `actor` (the
  reviewer's key name, or `tokenwire` for an expiry), `decision`, `reason`
  (scrubbed, at most 512 characters).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from tokenwire_server.audit.records import AuditRecord
from tokenwire_server.errors import clip
from tokenwire_server.governance.scrub import scrub, scrub_labels

ESCALATED = "escalated"
REVIEWED = "reviewed"
#: The longest reviewer's reason a row keeps.
MAX_REASON_CHARS = 512


def review_row(
    *,
    event: str,
    method: str,
    response_id: str,
    tenant: str,
    detail: Mapping[str, object],
    status: str = "OK",
    error_reason: str = "",
    request_id: str = "",
    trace_id: str = "",
    labels: Mapping[str, str] | None = None,
    model: str = "",
    model_version: str = "",
    policy_id: str = "",
    policy_version: str = "",
    verdict: str = "",
    final_sha256: str = "",
    created_at_ns: int | None = None,
) -> AuditRecord:
    """One `escalated` or `reviewed` row; `detail` becomes its one `actions` entry
    (a `reason` in it is scrubbed and clipped)."""
    entry = dict(detail)
    if isinstance(entry.get("reason"), str):
        entry["reason"] = clip(
            scrub(str(entry["reason"])[: MAX_REASON_CHARS * 2]), MAX_REASON_CHARS
        )
    return AuditRecord(
        event=event,
        response_id=response_id,
        request_id=scrub(request_id),
        trace_id=trace_id,
        tenant=tenant,
        method=method,
        status=status,
        error_reason=error_reason,
        labels=scrub_labels(labels or {}),
        model=model,
        model_version=model_version,
        policy_id=policy_id,
        policy_version=policy_version,
        delivery_mode="",
        chunk_count=0,
        last_sequence=0,
        final_sha256=final_sha256,
        verdict=verdict,
        review_required=True,
        verification="",
        retract_from_sequence=0,
        actions=[entry],
        finish_reason="",
        prompt_tokens=0,
        completion_tokens=0,
        time_to_first_token_ms=0.0,
        total_ms=0.0,
        created_at_ns=time.time_ns() if created_at_ns is None else created_at_ns,
    )
