"""A fake OpenAI-compatible upstream for the real-path benchmark.

`POST /v1/chat/completions` answers `stream: true` with one
`chat.completion.chunk` event per token, a usage chunk when
`stream_options.include_usage` asks for it, then `data: [DONE]`; `max_tokens`
sets the token count. The tokens are deterministic English-like word pieces
(`answer(n)` gives the exact text), so a benchmark can check what came out
the other end. Events are rendered once per token count and, with no delay,
written in one piece: the fake must never be what limits the measurement.

It also accepts OTLP/HTTP trace exports (`POST /v1/traces`) and drops them, so
tokenwire can export spans as a deployment would without a collector.

Prints `fake-openai serving on HOST:PORT` once listening.

    python bench/fake_openai.py [--port 0] [--ttft-ms 0] [--inter-token-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time

from aiohttp import web
from serving import serve_http

TEXT = (
    "the model streams tokens in order and every chunk carries its sequence;"
    " a gateway that verifies the final payload can say when streamed text"
    " diverged, so callers never act on words that were later withdrawn."
    " Latency budgets of 2 ms and 40 ms per 1,000 tokens are checked here;"
    " questions go to ops-team @exam ple.com before release."
)
#: Word pieces; "@exam" and "ple.com" join the word before them, so the answer
#: carries an email address split across three tokens for governance to find.
WORDS = TEXT.split()
_GLUED = {"@exam", "ple.com"}


def token(index: int) -> str:
    """The index-th token: a word with its leading space (none for the first)."""
    word = WORDS[index % len(WORDS)]
    return word if index == 0 or word in _GLUED else " " + word


def answer(tokens: int) -> str:
    return "".join(token(i) for i in range(tokens))


def _chunk(delta: dict[str, str], finish: str | None, usage: dict[str, int] | None) -> bytes:
    payload: dict[str, object] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
    }
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@functools.lru_cache(maxsize=64)
def events(tokens: int, usage: bool) -> tuple[bytes, ...]:
    """Every event of one answer, rendered once per (token count, usage)."""
    rendered = [_chunk({"role": "assistant", "content": token(0)}, None, None)]
    rendered += [_chunk({"content": token(i)}, None, None) for i in range(1, tokens)]
    rendered.append(_chunk({}, "length", None))
    if usage:
        counts = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        rendered.append(_chunk({}, None, counts))
    rendered.append(b"data: [DONE]\n\n")
    return tuple(rendered)


async def completions(request: web.Request) -> web.StreamResponse:
    arrived = time.perf_counter_ns()
    body = await request.json()
    tokens = int(body.get("max_tokens") or 16)
    settings: argparse.Namespace = request.app["settings"]
    if not body.get("stream"):
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer(tokens)},
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 8, "completion_tokens": tokens},
            }
        )
    usage = bool((body.get("stream_options") or {}).get("include_usage")) and settings.usage
    rendered = events(tokens, usage)
    if settings.stamp_arrival:  # bench/first_token_split.py reads it back
        first = {"role": "assistant", "content": f"{arrived} {token(0)}"}
        rendered = (_chunk(first, None, None), *rendered[1:])
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    if settings.ttft_ms:
        await asyncio.sleep(settings.ttft_ms / 1000)
    if settings.inter_token_ms:
        for event in rendered:
            await response.write(event)
            await asyncio.sleep(settings.inter_token_ms / 1000)
    else:
        await response.write(b"".join(rendered))
    return response


async def traces(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


async def serve(settings: argparse.Namespace) -> None:
    app = web.Application()
    app["settings"] = settings
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/traces", traces)
    await serve_http(app, settings.port, "fake-openai")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--inter-token-ms", type=float, default=0.0)
    parser.add_argument("--no-usage", dest="usage", action="store_false")
    parser.add_argument(
        "--stamp-arrival", action="store_true",
        help="begin each streamed answer with the moment its request arrived (perf_counter_ns)",
    )  # fmt: skip
    asyncio.run(serve(parser.parse_args()))
