"""Baseline for the benchmarks: a bare grpc.aio server-streaming handler.

It streams a pre-built `StreamRespondResponse` of the same size as a tokenwire
one-token chunk, with no interceptors, no pipeline and no per-message work
beyond the write, so it is the ceiling grpc.aio sets on this machine.
Prints `raw serving on HOST:PORT` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from serving import serve_stream_respond

from tokenwire.v1 import respond_pb2 as pb

METHOD = "/tokenwire.v1.RespondService/StreamRespond"


def sample_event(sequence: int = 1) -> pb.StreamRespondResponse:
    """The shape of a tokenwire one-token chunk, field for field."""
    ns = time.time_ns()
    return pb.StreamRespondResponse(
        chunk=pb.TokenChunk(
            response_id="rsp_0123456789abcdef0123456789abcdef",
            sequence=sequence,
            text=" token",
            text_offset=6 * sequence,
            token_count=1,
            governance=pb.Governance(
                policy_id="pass-through",
                policy_version="1",
                model="tokenwire-sim",
                model_version="sim-2026.11",
            ),
            emitted_at={"seconds": ns // 1_000_000_000, "nanos": ns % 1_000_000_000},
        )
    )


async def serve(port: int) -> None:
    payload = sample_event(1000)

    async def stream(request: pb.StreamRespondRequest, context: Any) -> AsyncIterator[Any]:
        count = int(request.labels.get("count", "1000"))
        for _ in range(count):
            yield payload

    await serve_stream_respond(stream, port, "raw")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))
