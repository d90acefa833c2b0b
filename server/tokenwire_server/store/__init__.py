"""Where responses live after their first call: replay, resume, idempotency, cancel."""
