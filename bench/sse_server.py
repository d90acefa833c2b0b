"""Baseline for the benchmarks: the Server-Sent Events endpoint users would otherwise pick.

An aiohttp server streaming OpenAI-style `chat.completion.chunk` events, one
token each, then `data: [DONE]`; `?tokens=N` sets the count. Prints
`sse serving on HOST:PORT` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web
from serving import serve_http


def event(token: str) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def stream(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("tokens", "1000"))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = event(" token")
    for _ in range(count):
        await response.write(chunk)
    await response.write(b"data: [DONE]\n\n")
    return response


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    await serve_http(app, port, "sse")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))
