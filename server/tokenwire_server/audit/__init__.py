"""The audit trail: an append-only, hash-chained row per event of a response, never
with prompt or output text."""
