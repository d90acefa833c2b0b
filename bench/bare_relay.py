"""The floor of the stack: a bare grpc.aio relay with tokenwire's contract shape, nothing else.

`StreamRespond` posts the request to an OpenAI-compatible upstream (one pooled
aiohttp session) and forwards each SSE delta as a `TokenChunk` (sequence,
text_offset), then one `Completed` with the text's SHA-256. `Respond` answers
every call with one prebuilt `RespondResponse` shaped like tokenwire's echo
answer. No auth, governance, store, spans, audit, logs or metrics.
Prints `bare-relay serving on HOST:PORT` once listening.

    python bench/bare_relay.py --upstream-url http://127.0.0.1:PORT/v1 [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from serving import serve_stream_respond

from tokenwire.v1 import respond_pb2 as pb

ECHO = "short ok"


def prebuilt_answer() -> pb.RespondResponse:
    return pb.RespondResponse(
        completed=pb.Completed(
            response_id="rsp_0123456789abcdef0123456789abcdef",
            final_text=ECHO,
            final_sha256=hashlib.sha256(ECHO.encode()).hexdigest(),
            chunk_count=1,
            last_sequence=1,
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
            verdict=pb.VERDICT_ALLOWED,
            verification=pb.Verification(status=pb.VERIFICATION_STATUS_VERIFIED),
            model="echo",
            policy_id="pass-through",
            delivery_mode=pb.DELIVERY_MODE_BUFFERED,
        )
    )


async def serve(upstream_url: str, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    url = upstream_url.rstrip("/") + "/chat/completions"
    answer = prebuilt_answer()

    async def stream(request: pb.StreamRespondRequest, context: Any) -> AsyncIterator[Any]:
        body = {
            "model": request.model,
            "messages": [{"role": "user", "content": m.content} for m in request.messages],
            "max_tokens": request.params.max_tokens,
            "stream": True,
        }
        digest, parts, sequence, offset = hashlib.sha256(), [], 0, 0
        async with session.post(url, json=body) as response:
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                for choice in orjson.loads(line[6:]).get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        sequence += 1
                        data = text.encode()
                        digest.update(data)
                        parts.append(text)
                        yield pb.StreamRespondResponse(
                            chunk=pb.TokenChunk(
                                sequence=sequence, text=text, text_offset=offset, token_count=1
                            )
                        )
                        offset += len(data)
        yield pb.StreamRespondResponse(
            completed=pb.Completed(
                final_text="".join(parts),
                final_sha256=digest.hexdigest(),
                chunk_count=sequence,
                last_sequence=sequence,
            )
        )

    async def respond(request: pb.RespondRequest, context: Any) -> pb.RespondResponse:
        return answer

    try:
        await serve_stream_respond(stream, port, "bare-relay", respond)
    finally:
        await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.upstream_url, arguments.port))
