"""Baseline for `scale.py`: bare grpc.aio streaming paced chunks, nothing else.

Each `StreamRespond` call streams `tokenwire.sim/answer-tokens` one-token
chunks on the schedule tokenwire's simulator keeps (first after `ttft-ms`,
then one every `inter-token-ms`, from the call's start, never drifting), then
a `Completed` with the SHA-256 of the text. No interceptors, no governance,
no delivery pipeline: per chunk only a timer wake-up, a small message and the
write, so it is what grpc.aio and asyncio alone cost at a given stream count.
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

TOKEN = " token"


async def stream(request: pb.StreamRespondRequest, context: Any) -> AsyncIterator[Any]:
    labels = request.labels
    tokens = int(labels.get("tokenwire.sim/answer-tokens", "64"))
    ttft = float(labels.get("tokenwire.sim/ttft-ms", "0")) / 1000
    interval = float(labels.get("tokenwire.sim/inter-token-ms", "0")) / 1000
    loop = asyncio.get_running_loop()
    first_due = loop.time() + ttft
    size = len(TOKEN.encode())
    for index in range(tokens):
        due = first_due + index * interval
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        ns = time.time_ns()
        yield pb.StreamRespondResponse(
            chunk=pb.TokenChunk(
                response_id="rsp_0123456789abcdef0123456789abcdef",
                sequence=index + 1,
                text=TOKEN,
                text_offset=index * size,
                token_count=1,
                emitted_at={"seconds": ns // 1_000_000_000, "nanos": ns % 1_000_000_000},
            )
        )
    yield pb.StreamRespondResponse(
        completed=pb.Completed(
            final_sha256=hashlib.sha256((TOKEN * tokens).encode()).hexdigest(),
            chunk_count=tokens,
            last_sequence=tokens,
        )
    )


async def serve(port: int) -> None:
    await serve_stream_respond(stream, port, "raw")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))
