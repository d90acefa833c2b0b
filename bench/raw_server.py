"""Baseline for the benchmarks: a bare grpc.aio server-streaming handler.

It streams a pre-built `StreamRespondResponse` of the same size as a tokenwire
one-token chunk, with no interceptors, no pipeline and no per-message work
beyond the write, so it is the ceiling grpc.aio sets on this machine.
Prints `raw serving on HOST:PORT` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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


async def serve(port: int, mode: str) -> None:
    payload = sample_event(1000)
    template = sample_event(1)
    for name in ("sequence", "text", "text_offset", "emitted_at"):
        template.chunk.ClearField(name)

    async def prebuilt(request: pb.StreamRespondRequest, context: Any) -> AsyncIterator[Any]:
        count = int(request.labels.get("count", "1000"))
        for _ in range(count):
            yield payload

    async def built(request: pb.StreamRespondRequest, context: Any) -> AsyncIterator[Any]:
        """Each message built as tokenwire's codec builds a chunk, and (`checked`)
        verified as its gate verifies one: what the contract costs at least."""
        count = int(request.labels.get("count", "1000"))
        check = mode == "checked"
        digest, sent, next_sequence, next_offset = hashlib.sha256(), [], 1, 0
        for sequence in range(1, count + 1):
            event = pb.StreamRespondResponse()
            event.CopyFrom(template)
            chunk = event.chunk
            chunk.sequence = sequence
            chunk.text = " token"
            chunk.text_offset = 6 * (sequence - 1)
            chunk.token_count = 1
            ns = time.time_ns()
            chunk.emitted_at.seconds = ns // 1_000_000_000
            chunk.emitted_at.nanos = ns % 1_000_000_000
            if check:
                sent_chunk = event.chunk
                data = sent_chunk.text.encode()
                if sent_chunk.sequence != next_sequence or sent_chunk.text_offset != next_offset:
                    raise RuntimeError("out of order")
                digest.update(data)
                sent.append(data)
                next_sequence, next_offset = next_sequence + 1, next_offset + len(data)
            yield event

    await serve_stream_respond(prebuilt if mode == "prebuilt" else built, port, "raw")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=("prebuilt", "built", "checked"),
        default="prebuilt",
        help="yield one pre-built message (the baseline), build each, or build and check each",
    )
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.mode))
