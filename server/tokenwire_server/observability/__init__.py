"""Metrics, traces and logs: how operators see what streams do."""
