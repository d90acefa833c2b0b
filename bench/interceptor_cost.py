"""What each interceptor costs per message, measured in the server under load.

Starts a bare grpc.aio baseline (bench/raw_server.py), the full `tokenwire
serve`, and one server per interceptor with that interceptor left out
(bench/chain_variant_server.py), plus one with the whole chain left out; then
alternates per_message-style runs (one token per chunk, simulator at zero
delay) between all of them and prints, per stream count, each variant's
messages/s, its ratio to the baseline, its server CPU per message and what
leaving the interceptor out saved against the full chain. Its findings, and how
they compare with microbenchmarks: docs/performance.md#per-message.

    python bench/interceptor_cost.py [--streams 8 64] [--repeats 3] [--messages 64000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from per_message import ROOT, Process, measure, raw_request, start, tokenwire_request

INTERCEPTORS = (
    ("verification gate", "VerificationGateStage"),
    ("observability", "ObservabilityStage"),
    ("audit", "AuditStage"),
    ("limits", "LimitsStage"),
    ("deadlines", "DeadlineStage"),
    ("request context", "RequestContextStage"),
    ("tracing", "TracingStage"),
)
SERVE_FLAGS = (
    "--port", "0", "--sim-time-to-first-token", "0", "--sim-inter-token-delay", "0",
    "--max-tokens-cap", "1000000", "--audit-path", ":memory:", "--log-level", "WARNING",
)  # fmt: skip


async def start_variant(left_out: tuple[str, ...]) -> Process:
    launcher = str(ROOT / "bench" / "chain_variant_server.py")
    return await start(sys.executable, launcher, "--without", *left_out, "--", *SERVE_FLAGS)


async def main(args: argparse.Namespace) -> None:
    variants: list[tuple[str, tuple[str, ...]]] = [("full chain", ())]
    variants += [(f"without {label}", (name,)) for label, name in INTERCEPTORS]
    variants.append(("without the whole chain", tuple(name for _, name in INTERCEPTORS)))
    raw = await start(sys.executable, str(ROOT / "bench" / "raw_server.py"))
    servers = [await start_variant(left_out) for _, left_out in variants]
    try:
        print(
            f"per-message cost of each interceptor: {args.messages} one-token chunks per run, "
            f"median of {args.repeats} alternating runs\n"
        )
        header = (
            f"{'streams':>7} | {'server':<33} | {'msg/s':>8} | {'ratio':>5} | "
            f"{'CPU µs/msg':>10} | {'saved µs/msg':>12}"
        )
        print(header)
        print("-" * len(header))
        for streams in args.streams:
            per_stream = max(args.messages // streams, 200)
            raw_runs: list[tuple[float, float]] = []
            runs: list[list[tuple[float, float]]] = [[] for _ in variants]
            for _ in range(args.repeats):
                raw_runs.append(await measure(raw, raw_request, streams, per_stream))
                for index, server in enumerate(servers):
                    runs[index].append(
                        await measure(server, tokenwire_request, streams, per_stream)
                    )
            raw_rate = statistics.median(r[0] for r in raw_runs)
            raw_cpu = statistics.median(r[1] for r in raw_runs)
            print(
                f"{streams:>7} | {'bare grpc.aio (pre-built messages)':<33} | {raw_rate:>8,.0f} | "
                f"{1:>5.2f} | {raw_cpu:>10.1f} | {'':>12}"
            )
            full_cpu = statistics.median(r[1] for r in runs[0])
            for (label, _), variant_runs in zip(variants, runs, strict=True):
                rate = statistics.median(r[0] for r in variant_runs)
                cpu = statistics.median(r[1] for r in variant_runs)
                saved = f"{full_cpu - cpu:>12.1f}" if label != "full chain" else f"{'':>12}"
                print(
                    f"{streams:>7} | {label:<33} | {rate:>8,.0f} | {rate / raw_rate:>5.2f} | "
                    f"{cpu:>10.1f} | {saved}"
                )
    finally:
        for server in (raw, *servers):
            server.process.terminate()
            await server.process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=64000, help="messages per run")
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
