"""What the audit trail keeps about a response: decisions and metadata, never values."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One chunk as sent: where its text sits, not what it says."""

    sequence: int
    text_offset: int
    byte_length: int
    token_count: int
    action_count: int
    emitted_at_ns: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One event of a response, as one row of the append-only trail.

    `event` is what happened: `accepted` / `resumed` (a stream's response is
    registered; committed before its first event leaves), `completed`,
    `failed`, `cancelled`, or `refused` (the call ended before a response
    existed). `resumed_after` is the sequence a resume call replayed from (-1
    when the call was not a resume).
    """

    event: str
    response_id: str
    request_id: str
    trace_id: str
    tenant: str
    method: str
    status: str
    error_reason: str
    labels: dict[str, str]
    model: str
    model_version: str
    policy_id: str
    policy_version: str
    delivery_mode: str
    chunk_count: int
    last_sequence: int
    final_sha256: str
    verdict: str
    review_required: bool
    verification: str
    retract_from_sequence: int
    actions: list[dict[str, object]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float
    total_ms: float
    created_at_ns: int
    token_events: tuple[TokenEvent, ...] = ()
    resumed_after: int = -1
