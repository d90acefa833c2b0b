"""Added latency of the redaction stage, per chunk.

Two measurements in one run:

1. In process: the governance session's cost per token (one token = one
   chunk here) for the pass-through policy and for `builtin:default` (every
   built-in detector), over simulator-like prose with PII sprinkled in.
2. End to end: a tokenwire server per policy (separate processes, loopback),
   one-token chunks at zero simulator delay, client-observed chunk rate and
   server CPU per chunk.

    python bench/redaction.py [--tokens 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_message import measure, start_tokenwire, tokenwire_request

from tokenwire_server.governance.policy import PassThroughPolicy, Policy
from tokenwire_server.governance.policy_file import load_policy

PROSE = (
    "The stream of tokens arrives in order and every chunk carries its sequence number. "
    "Operators trace requests across services and correlate logs with metrics. "
    "Contact ops at oncall@example.com or +1 415-555-0134 if host 10.0.0.12 stalls. "
)


def tokens(count: int) -> list[str]:
    text = PROSE * (count * 4 // len(PROSE) + 1)
    return [text[i : i + 4] for i in range(0, count * 4, 4)]


def per_token_us(policy: Policy, stream: list[str]) -> float:
    session = policy.open_session()
    started = time.perf_counter()
    for token in stream:
        session.push(token)
    session.finish()
    return (time.perf_counter() - started) / len(stream) * 1e6


async def main(args: argparse.Namespace) -> None:
    stream = tokens(args.tokens)
    policies = {
        "pass-through": PassThroughPolicy(),
        "builtin:default": load_policy("builtin:default"),
    }
    print(
        f"governance session cost per token ({len(stream)} 4-char tokens, "
        f"median of {args.repeats})\n"
    )
    print(f"{'policy':<16} | {'µs/token':>9} | {'added µs/token':>14}")
    print("-" * 46)
    base = 0.0
    for name, policy in policies.items():
        cost = statistics.median(per_token_us(policy, stream) for _ in range(args.repeats))
        base = base or cost
        print(f"{name:<16} | {cost:>9.2f} | {cost - base:>14.2f}")

    print(f"\nend to end: StreamRespond, one token per chunk, {args.chunks} chunks per run\n")
    servers = {}
    for name in policies:
        servers[name] = await start_tokenwire("--policy", name)
    try:
        print(
            f"{'policy':<16} | {'chunks/s':>9} | {'server CPU µs/chunk':>19} | "
            f"{'added µs/chunk':>14}"
        )
        print("-" * 70)
        base_cpu = 0.0
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for _ in range(args.repeats):
            for name, server in servers.items():
                runs[name].append(await measure(server, tokenwire_request, 1, args.chunks))
        for name in servers:
            rate = statistics.median(r[0] for r in runs[name])
            cpu = statistics.median(r[1] for r in runs[name])
            base_cpu = base_cpu or cpu
            print(f"{name:<16} | {rate:>9,.0f} | {cpu:>19.1f} | {cpu - base_cpu:>14.1f}")
    finally:
        for server in servers.values():
            server.process.terminate()
            await server.process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
