"""The audit trail: one durable record per response, never with prompt or output text."""
