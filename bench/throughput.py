"""Tokens per second with coalescing vs an SSE baseline, and time-to-first-token overhead.

Servers run as their own processes on loopback; everything is measured in the
same run, alternating, median of `--repeats`:

1. Tokens/s delivered to one client at 1 and 8 concurrent streams: tokenwire
   `StreamRespond` (STREAM mode, simulator at zero delay, coalescing up to
   `--chunk-tokens` tokens per chunk) against an aiohttp SSE server streaming
   OpenAI-style `data:` events, one token each (read with aiohttp).
2. Time to first token on an open channel (sequential requests): tokenwire's
   first chunk against a bare grpc.aio stream's first message; p50/p99 and
   the added milliseconds.

Answers are long (100,000 tokens) so the figure is the steady rate, not the
call setup that the time-to-first-token part measures on its own.

    python bench/throughput.py [--tokens 100000] [--chunk-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_message import ROOT, Process, percentile, raw_request, start, start_tokenwire

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc


def tokenwire_request(tokens: int, chunk_tokens: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="throughput")],
        params=pb.GenerationParams(max_tokens=tokens),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        chunking=pb.Chunking(max_tokens_per_chunk=chunk_tokens),
        labels={"tokenwire.sim/answer-tokens": str(tokens)},
    )


async def tokenwire_tokens_per_second(
    server: Process, streams: int, tokens: int, chunk_tokens: int
) -> float:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)

        async def one() -> int:
            received = 0
            async for event in stub.StreamRespond(tokenwire_request(tokens, chunk_tokens)):
                if event.HasField("chunk"):
                    received += event.chunk.token_count
            return received

        return await _rate(one, streams, tokens)


async def sse_tokens_per_second(address: str, streams: int, tokens: int) -> float:
    url = f"http://{address}/v1/stream?tokens={tokens}"
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            received = 0
            async with session.get(url) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        received += 1
            return received

        return await _rate(one, streams, tokens)


async def _rate(one: Callable[[], Awaitable[int]], streams: int, tokens: int) -> float:
    """Tokens/s over `streams` concurrent answers, after one warm-up answer;
    every answer must have delivered all `tokens`."""
    await one()
    started = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    assert all(c == tokens for c in counts), counts
    return sum(counts) / elapsed


async def first_message_ms(
    address: str, request: pb.StreamRespondRequest, count: int
) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        timings = []
        for _ in range(count + 10):
            started = time.perf_counter()
            call = stub.StreamRespond(request)
            async for event in call:
                if event.HasField("chunk"):
                    timings.append((time.perf_counter() - started) * 1e3)
                    break
            call.cancel()
    return timings[10:]  # the first calls warm the channel and the server


async def main(args: argparse.Namespace) -> None:
    tokenwire = await start_tokenwire()
    raw = await start(sys.executable, str(ROOT / "bench" / "raw_server.py"))
    sse = await start(sys.executable, str(ROOT / "bench" / "sse_server.py"))
    try:
        print(
            f"tokens/s delivered: {args.tokens} tokens per stream, coalescing up to "
            f"{args.chunk_tokens} tokens per chunk, median of {args.repeats} "
            f"({os.cpu_count()} cores, loopback)\n"
        )
        print(f"{'streams':>7} | {'SSE tokens/s':>12} | {'tokenwire tokens/s':>18} | {'ratio':>5}")
        print("-" * 53)
        for streams in (1, 8):
            per_stream = max(args.tokens // streams, 1000)
            sse_runs, tw_runs = [], []
            for _ in range(args.repeats):
                sse_runs.append(await sse_tokens_per_second(sse.address, streams, per_stream))
                tw_runs.append(
                    await tokenwire_tokens_per_second(
                        tokenwire, streams, per_stream, args.chunk_tokens
                    )
                )
            s, t = statistics.median(sse_runs), statistics.median(tw_runs)
            print(f"{streams:>7} | {s:>12,.0f} | {t:>18,.0f} | {t / s:>5.2f}")

        raw_ttft = await first_message_ms(raw.address, raw_request(16), args.ttft_requests)
        tw_ttft = await first_message_ms(
            tokenwire.address, tokenwire_request(16, 1), args.ttft_requests
        )
        print(f"\ntime to first token, {args.ttft_requests} sequential calls on an open channel\n")
        print(f"{'':>4} | {'raw grpc.aio ms':>15} | {'tokenwire ms':>12} | {'added ms':>8}")
        print("-" * 49)
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            r, t = percentile(raw_ttft, q), percentile(tw_ttft, q)
            print(f"{label:>4} | {r:>15.3f} | {t:>12.3f} | {t - r:>8.3f}")
    finally:
        for server in (tokenwire, raw, sse):
            server.process.terminate()
            await server.process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=100000)
    parser.add_argument("--chunk-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft-requests", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
