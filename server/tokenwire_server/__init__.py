"""tokenwire server: ordered, governed, verifiable delivery of LLM output over gRPC."""

__version__ = "0.1.0"
