"""Delivery: how generated, governed text becomes chunks on the wire."""
