"""What pacing a simulated generation costs, isolated from gRPC and delivery.

Runs N paced generations in one event loop, each consumed by a no-op reader,
with three pacers, and prints CPU per token and how late tokens come out
against the schedule (start + ttft + i * interval):

* `relative`: `asyncio.sleep(interval)` after each token (the simulator before
  `bench/scale.py`): every wake-up's lateness is added to all later tokens;
* `absolute`: `asyncio.sleep` until token i's due time (no drift, one timer
  handle per token);
* `ticker`: the simulator now, `SimulatorBackend.generate` (absolute, and one
  timer per millisecond slot shared by every generation).

    python bench/sim_pacing.py [--streams 2000] [--seconds 10] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from tokenwire_server.backends.simulator import SimulatorBackend
from tokenwire_server.config import SimulatorConfig
from tokenwire_server.domain import GenerationRequest, Message, Role

Pacer = Callable[[int, float, float], AsyncIterator[object]]


async def relative(tokens: int, ttft: float, interval: float) -> AsyncIterator[object]:
    await asyncio.sleep(ttft)
    for index in range(tokens):
        if index:
            await asyncio.sleep(interval)
        yield index


async def absolute(tokens: int, ttft: float, interval: float) -> AsyncIterator[object]:
    loop = asyncio.get_running_loop()
    first = loop.time() + ttft
    for index in range(tokens):
        due = first + index * interval
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        yield index


def ticker(backend: SimulatorBackend) -> Pacer:
    def generate(tokens: int, ttft: float, interval: float) -> AsyncIterator[object]:
        request = GenerationRequest(
            model="tokenwire-sim",
            messages=(Message(Role.USER, "pacing"),),
            max_tokens=tokens,
            labels={
                "tokenwire.sim/answer-tokens": str(tokens),
                "tokenwire.sim/ttft-ms": str(ttft * 1000),
                "tokenwire.sim/inter-token-ms": str(interval * 1000),
            },
        )
        return backend.generate(request)

    return generate


async def measure(pacer: Pacer, streams: int, seconds: float, rate: float) -> tuple[float, ...]:
    """(CPU µs per token, lateness p50 ms, p99 ms, max ms)."""
    loop = asyncio.get_running_loop()
    tokens, interval, ttft = round(seconds * rate), 1 / rate, 1 / rate
    lateness: list[float] = []

    async def one(offset: float) -> None:
        await asyncio.sleep(offset)
        first = loop.time() + ttft
        index = 0
        async for item in pacer(tokens, ttft, interval):
            if isinstance(item, (str, int)):
                lateness.append(loop.time() - (first + index * interval))
                index += 1

    cpu = time.process_time()
    await asyncio.gather(*(one(interval * i / streams) for i in range(streams)))
    cpu = time.process_time() - cpu
    late = np.array(lateness) * 1000
    return (
        cpu / len(late) * 1e6,
        *(float(x) for x in np.percentile(late, [50, 99, 100])),
    )


async def main(args: argparse.Namespace) -> None:
    backend = SimulatorBackend(SimulatorConfig())
    pacers: dict[str, Pacer] = {
        "relative": relative,
        "absolute": absolute,
        "ticker": ticker(backend),
    }
    print(f"{args.streams} generations x {args.rate:g} tokens/s x {args.seconds:g} s in one loop\n")
    print(f"{'pacer':>9} | {'CPU µs/token':>12} | {'late p50':>9} | {'p99':>9} | {'max':>9}")
    for name, pacer in pacers.items():
        cpu, p50, p99, worst = await measure(pacer, args.streams, args.seconds, args.rate)
        print(f"{name:>9} | {cpu:>12.1f} | {p50:>6.2f} ms | {p99:>6.2f} ms | {worst:>6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0)
    asyncio.run(main(parser.parse_args()))
