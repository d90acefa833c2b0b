"""The simulator keeps its schedule: token i is due at start + ttft + i * delay.

Sleeping `delay` after each token instead let every late wake-up push all later
tokens back, so a busy server drifted seconds behind the schedule the caller
asked for; `bench/scale.py` measures latency against that schedule.
"""

from __future__ import annotations

import asyncio
import time

from tokenwire_server.backends.simulator import SimulatorBackend
from tokenwire_server.config import SimulatorConfig
from tokenwire_server.domain import Finish, FinishReason, GenerationRequest, Message, Role


def paced(tokens: int, delay_ms: float, ttft_ms: float = 0) -> GenerationRequest:
    return GenerationRequest(
        model="tokenwire-sim",
        messages=(Message(Role.USER, "pacing"),),
        max_tokens=tokens,
        labels={
            "tokenwire.sim/answer-tokens": str(tokens),
            "tokenwire.sim/inter-token-ms": str(delay_ms),
            "tokenwire.sim/ttft-ms": str(ttft_ms),
        },
    )


async def test_a_late_reader_does_not_shift_later_tokens() -> None:
    backend = SimulatorBackend(SimulatorConfig())
    loop = asyncio.get_running_loop()
    start = loop.time()
    arrivals: list[float] = []
    async for item in backend.generate(paced(40, 5, ttft_ms=10)):
        if isinstance(item, Finish):
            break
        # Tokens that were all due by now come as one burst (a list).
        arrivals.extend([loop.time() - start] * (len(item) if isinstance(item, list) else 1))
        if len(arrivals) == 2:
            time.sleep(0.1)  # noqa: ASYNC251 - blocking the loop for 20 token steps is the point
    assert len(arrivals) == 40
    for index, arrival in enumerate(arrivals):
        assert arrival >= 0.010 + index * 0.005 - 0.001, f"token {index} came early"
    # Drifting, the last token would come after 0.205 s + the 0.1 s stall.
    assert arrivals[-1] < 0.205 + 0.08


async def test_cancelling_one_generation_leaves_those_sharing_its_tick() -> None:
    backend = SimulatorBackend(SimulatorConfig())

    async def drain() -> int:
        count = 0
        async for item in backend.generate(paced(10, 5)):
            count += len(item) if isinstance(item, list) else isinstance(item, str)
        return count

    tasks = [asyncio.create_task(drain()) for _ in range(3)]
    await asyncio.sleep(0.012)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == results[2] == 10
    assert isinstance(results[1], asyncio.CancelledError)
    assert backend.stats.cancelled == 1 and backend.stats.finished == 2


async def test_a_huge_answer_label_costs_only_what_max_tokens_lets_out() -> None:
    backend = SimulatorBackend(SimulatorConfig())
    request = GenerationRequest(
        model="tokenwire-sim",
        messages=(Message(Role.USER, "huge"),),
        max_tokens=16,
        labels={"tokenwire.sim/answer-tokens": "1000000"},  # the largest allowed
    )
    items = [item async for item in backend.generate(request)]
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.LENGTH
    tokens = [t for item in items[:-1] for t in (item if isinstance(item, list) else [item])]
    assert len(tokens) == 16
