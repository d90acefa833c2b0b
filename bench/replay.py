"""Replay overhead: how fast a resumed stream gets going and how fast it replays.

Starts a tokenwire server (separate process, loopback, in-memory store),
generates one finished resumable response of N one-token chunks, then
measures in the same run:

* time from a `resume` call to its first replayed chunk (p50/p99 over many
  resumes at the middle of the log), against the time to first chunk of a
  fresh call at zero simulator delay (the baseline);
* replayed chunks per second for a full replay, against the same response
  streamed live the first time.

    python bench/replay.py [--chunks 4000] [--resumes 200] [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import grpc
import redis.asyncio as redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_message import percentile, start_tokenwire

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc


def fresh(chunks: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="replay benchmark")],
        params=pb.GenerationParams(max_tokens=chunks),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/answer-tokens": str(chunks)},
        resumable=True,
    )


def resume(response_id: str, after: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        resume=pb.ResumeFrom(response_id=response_id, after_sequence=after)
    )


async def first_chunk_seconds(
    stub: respond_pb2_grpc.RespondServiceStub, request: pb.StreamRespondRequest
) -> float:
    started = time.perf_counter()
    call = stub.StreamRespond(request)
    async for event in call:
        if event.HasField("chunk"):
            elapsed = time.perf_counter() - started
            call.cancel()
            return elapsed
    raise RuntimeError("no chunk")


async def full_read(
    stub: respond_pb2_grpc.RespondServiceStub, request: pb.StreamRespondRequest
) -> tuple[int, float, str]:
    started = time.perf_counter()
    chunks, response_id = 0, ""
    async for event in stub.StreamRespond(request):
        if event.HasField("chunk"):
            chunks += 1
            response_id = event.chunk.response_id
    return chunks, time.perf_counter() - started, response_id


async def measure(store: str, args: argparse.Namespace) -> dict[str, float]:
    server = await start_tokenwire("--store", store)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            live_chunks, live_seconds, response_id = await full_read(stub, fresh(args.chunks))
            replay_rates = []
            for _ in range(args.repeats):
                count, seconds, _ = await full_read(stub, resume(response_id, 0))
                assert count == live_chunks
                replay_rates.append(count / seconds)
            small = fresh(16)
            small.resumable = False
            fresh_ttft = [await first_chunk_seconds(stub, small) for _ in range(args.resumes)]
            resume_ttft = [
                await first_chunk_seconds(stub, resume(response_id, args.chunks // 2))
                for _ in range(args.resumes)
            ]
    finally:
        server.process.terminate()
        await server.process.wait()
    return {
        "live": live_chunks / live_seconds,
        "replay": statistics.median(replay_rates),
        "fresh_p50": percentile(fresh_ttft, 0.5) * 1e3,
        "fresh_p99": percentile(fresh_ttft, 0.99) * 1e3,
        "resume_p50": percentile(resume_ttft, 0.5) * 1e3,
        "resume_p99": percentile(resume_ttft, 0.99) * 1e3,
    }


async def main(args: argparse.Namespace) -> None:
    stores = {"memory": "memory"}
    redis_process = None
    if args.redis:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise SystemExit("--redis needs redis-server on PATH")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        redis_process = await asyncio.create_subprocess_exec(
            redis_server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
        )
        stores["redis"] = f"redis://127.0.0.1:{port}/0"
        client = redis.from_url(stores["redis"])
        for _ in range(100):
            try:
                await client.ping()
                break
            except redis.ConnectionError:
                await asyncio.sleep(0.05)
        await client.aclose()
    try:
        print(f"replay overhead ({args.chunks} one-token chunks, loopback)\n")
        header = (
            f"{'store':<7} | {'live chunks/s':>13} | {'replay chunks/s':>15} | {'ratio':>5} | "
            f"{'fresh 1st ms p50/p99':>20} | {'resume 1st ms p50/p99':>21}"
        )
        print(header)
        print("-" * len(header))
        for name, store in stores.items():
            r = await measure(store, args)
            print(
                f"{name:<7} | {r['live']:>13,.0f} | {r['replay']:>15,.0f} | "
                f"{r['replay'] / r['live']:>5.2f} | "
                f"{r['fresh_p50']:>9.2f} / {r['fresh_p99']:<8.2f} | "
                f"{r['resume_p50']:>9.2f} / {r['resume_p99']:<9.2f}"
            )
    finally:
        if redis_process is not None:
            redis_process.terminate()
            await redis_process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--resumes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="also measure the Redis store")
    asyncio.run(main(parser.parse_args()))
