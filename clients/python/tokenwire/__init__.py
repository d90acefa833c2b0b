"""tokenwire: Python client for ordered, governed, verifiable LLM output over gRPC.

    from tokenwire import Client
    with Client("localhost:50051") as client:
        for event in client.stream("Tell me about gRPC", mode="stream"):
            ...

The generated stubs live in `tokenwire.v1` (`respond_pb2`, `respond_pb2_grpc`).
"""

from tokenwire.client import (
    AsyncClient,
    AsyncResponseStream,
    Client,
    ResponseStream,
    ResumePolicy,
    tls_credentials,
)
from tokenwire.errors import (
    DataLoss,
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    TokenwireError,
    Unavailable,
)
from tokenwire.observed import Observation, Observed
from tokenwire.stream import (
    Chunk,
    Completion,
    Event,
    Heartbeat,
    Result,
    Retraction,
    ToolCall,
    ToolCallFragment,
)
from tokenwire.tools import assistant_message, tool_result_message

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncResponseStream",
    "Chunk",
    "Client",
    "Completion",
    "DataLoss",
    "DeadlineExceeded",
    "Event",
    "Heartbeat",
    "IntegrityError",
    "InvalidArgument",
    "NotFound",
    "Observation",
    "Observed",
    "ProtocolError",
    "ResponseStream",
    "Result",
    "ResumePolicy",
    "Retraction",
    "TokenwireError",
    "ToolCall",
    "ToolCallFragment",
    "Unavailable",
    "assistant_message",
    "tls_credentials",
    "tool_result_message",
]
