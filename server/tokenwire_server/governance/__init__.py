"""Governance: the stages every token passes before it may leave the server."""
