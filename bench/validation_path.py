"""What one local validator costs a stream, end to end (issue 21 point 7).

Starts, each as its own process on loopback: a validator that answers PASS at
once (ValidatorService.Validate), and two `tokenwire serve` processes, one
with that validator in its config file's `[[validators]]` and one without.
Then alternating rounds of sequential StreamRespond calls (echo model, no
simulated delays, one token per chunk) against each, and prints per server:
the time from the request to `Completed` (p50, p99), the time from the last
chunk to `Completed` (p50: what the validator's verdict adds before the
terminal message), and the stream's tokens per second. Targets: `Completed`
at most 2 ms later at p50, tokens/s within 5% of the server without one.

    python bench/validation_path.py [--rounds 5] [--calls 200] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

VALIDATOR = """
import asyncio, grpc, sys
from tokenwire.v1 import validator_pb2 as vpb, validator_pb2_grpc as vgrpc
class Pass(vgrpc.ValidatorServiceServicer):
    async def Validate(self, request, context):
        return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
async def main():
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(Pass(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


async def _start(*argv: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    return process, line


async def _serve(config: Path | None) -> tuple[asyncio.subprocess.Process, str]:
    flags = ["--port", "0", "--audit-path", ":memory:", "--log-level", "WARNING"]
    flags += ["--sim-time-to-first-token", "0", "--sim-inter-token-delay", "0"]
    if config is not None:
        flags += ["--config", str(config)]
    process, line = await _start(sys.executable, "-m", "tokenwire_server", *flags)
    return process, line.rsplit(":", 1)[-1]


async def _call(stub: respond_pb2_grpc.RespondServiceStub, request: pb.StreamRespondRequest):
    started = time.perf_counter()
    first = last = completed = 0.0
    tokens = 0
    async for event in stub.StreamRespond(request):
        now = time.perf_counter()
        if event.HasField("chunk"):
            first = first or now
            last = now
            tokens += event.chunk.token_count
        elif event.HasField("completed"):
            completed = now
            assert event.completed.verification.checks_passed
    return completed - started, completed - last, tokens / (last - first) if last > first else 0.0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    validator, port = await _start(sys.executable, "-c", VALIDATOR)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tokenwire.toml"
        config.write_text(f'[[validators]]\nname = "pass"\naddress = "127.0.0.1:{port}"\n')
        servers = {"without": await _serve(None), "one validator": await _serve(config)}
        text = " ".join(f"w{i}" for i in range(args.tokens))
        request = pb.StreamRespondRequest(
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)],
            model="echo",
            delivery_mode=pb.DELIVERY_MODE_STREAM,
            chunking=pb.Chunking(max_tokens_per_chunk=1),
            labels={"tokenwire.sim/echo-token-chars": "4"},
        )
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
        channels = {
            name: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for name, (_, p) in servers.items()
        }
        try:
            stubs = {n: respond_pb2_grpc.RespondServiceStub(c) for n, c in channels.items()}
            for stub in stubs.values():
                for _ in range(20):
                    await _call(stub, request)
            for round_ in range(args.rounds):
                order = list(stubs) if round_ % 2 == 0 else list(reversed(stubs))
                for name in order:
                    for _ in range(args.calls):
                        results[name].append(await _call(stubs[name], request))
        finally:
            for channel in channels.values():
                await channel.close()
            for process, _ in (*servers.values(), (validator, "")):
                process.terminate()
                await process.wait()
    print(f"{args.rounds} alternating rounds x {args.calls} calls, {args.tokens} tokens each")
    print(
        f"{'server':<14} | {'to Completed p50':>16} | {'p99':>8} | "
        f"{'last chunk -> Completed p50':>27} | {'tokens/s p50':>12}"
    )
    summary = {}
    for name, rows in results.items():
        total = [r[0] * 1000 for r in rows]
        tail = [r[1] * 1000 for r in rows]
        rate = [r[2] for r in rows]
        summary[name] = (_p(total, 0.5), _p(tail, 0.5), statistics.median(rate))
        print(
            f"{name:<14} | {_p(total, 0.5):>13.2f} ms | {_p(total, 0.99):>5.2f} ms | "
            f"{_p(tail, 0.5):>24.2f} ms | {statistics.median(rate):>12,.0f}"
        )
    (base_total, base_tail, base_rate), (total, tail, rate) = summary.values()
    print(f"request to Completed: {total - base_total:+.2f} ms at p50")
    print(
        f"Completed later by {tail - base_tail:.2f} ms at p50 (target <= 2 ms); "
        f"tokens/s {rate / base_rate:.3f}x (target >= 0.95x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=256)
    asyncio.run(main(parser.parse_args()))
