"""Memory that stays flat (issue 24 point 4): a fresh server, then the same after many calls.

Starts the zero-delay fake OpenAI upstream, the fake OTLP collector and, per
tokenwire source, one `tokenwire serve` as deployed (bench/floor.py: spans
exported, SQLite audit file, INFO logs, /metrics on). Then:

1. fresh: after `--warmup` calls, `--blocks` alternating blocks of
   `--probe-calls` sequential 256-token calls, the upstream read directly and
   through each server: added time to first token (p50, p99 of the server's
   block minus the direct block beside it) and the server's RSS (VmRSS);
2. `--calls` more 256-token answers through each server, `--concurrency` at a
   time (every answer checked as in bench/floor.py);
3. after: the same probes and RSS again.

Prints, per server, RSS and added TTFT fresh and after, with the ratio
(target: within 10%, so at most 1.10). Default settings keep every ended
response for `retention` (600 s) up to `store_max_responses` (10,000), so the
10,000 calls all stay in the store.

    python bench/memory_flat.py [--calls 10000] [--concurrency 16] [--probe-calls 200]
                                [--blocks 3] [--tokenwire-src DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import Upstream, start_server
from per_message import (
    Process,
    add_source_argument,
    percentile,
    print_table,
    source_label,
    start_all,
    stop_all,
)
from upstream_path import DirectPath, TokenwirePath, time_to_first_token

MIB = 1024 * 1024
TOKENS = 256


@dataclass
class Phase:
    """One phase's probes of one server: added TTFT per block, RSS at the end."""

    added_p50: list[float] = field(default_factory=list)
    added_p99: list[float] = field(default_factory=list)
    rss: int = 0


@dataclass
class Subject:
    name: str
    server: Process
    path: TokenwirePath
    phases: dict[str, Phase] = field(default_factory=dict)


async def probe(
    direct: DirectPath, subjects: list[Subject], phase: str, args: argparse.Namespace
) -> None:
    for subject in subjects:
        subject.phases[phase] = Phase()
    for _ in range(args.blocks):
        base = await time_to_first_token(direct, args.probe_calls, TOKENS)
        for subject in subjects:
            own = await time_to_first_token(subject.path, args.probe_calls, TOKENS)
            figures = subject.phases[phase]
            figures.added_p50.append(percentile(own, 0.50) - percentile(base, 0.50))
            figures.added_p99.append(percentile(own, 0.99) - percentile(base, 0.99))
    for subject in subjects:
        subject.phases[phase].rss = subject.server.rss_bytes()


async def fill(subject: Subject, calls: int, concurrency: int) -> float:
    """`calls` checked 256-token answers, `concurrency` at a time; returns seconds."""
    remaining = calls

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await subject.path.stream(TOKENS, lambda: None)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    fakes = await Upstream.start()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-memory-"))
    direct = DirectPath(fakes.base_url)
    subjects: list[Subject] = []
    sources: list[Path | None] = list(args.tokenwire_src) or [None]
    try:
        servers = await start_all(
            *(
                start_server("deployed", fakes, source, workdir / f"audit-{index}.db")
                for index, source in enumerate(sources)
            )
        )
        for source, server in zip(sources, servers, strict=True):
            name = f"tokenwire deployed [{source_label(source)}]"
            subjects.append(Subject(name, server, TokenwirePath(name, server)))
        for path in (direct, *(s.path for s in subjects)):
            for _ in range(args.warmup):
                await path.stream(TOKENS, lambda: None)
        await probe(direct, subjects, "fresh", args)
        for subject in subjects:
            took = await fill(subject, args.calls, args.concurrency)
            print(f"  {subject.name}: {args.calls} calls in {took:.1f} s", file=sys.stderr)
        await probe(direct, subjects, "after", args)
    finally:
        await direct.aclose()
        for subject in subjects:
            await subject.path.aclose()
        await stop_all([*(s.server for s in subjects), fakes.upstream, fakes.collector])
        shutil.rmtree(workdir, ignore_errors=True)
    report(subjects, args)


def report(subjects: list[Subject], args: argparse.Namespace) -> None:
    print(
        f"\nmemory and first token, fresh vs after {args.calls:,} calls of {TOKENS} tokens "
        f"({args.concurrency} at a time); added TTFT = median (min-max) over {args.blocks} "
        f"blocks of {args.probe_calls} sequential calls, minus the direct read beside each; "
        f"{os.cpu_count()} cores, loopback\n"
    )
    columns = ["server", "figure", "fresh", "after", "after / fresh", "target"]
    rows = []
    for subject in subjects:
        fresh, after = subject.phases["fresh"], subject.phases["after"]
        rss_ratio = after.rss / fresh.rss
        rows.append(
            [subject.name, "RSS MiB", f"{fresh.rss / MIB:.1f}", f"{after.rss / MIB:.1f}",
             f"{rss_ratio:.2f}", "≤ 1.10 " + ("held" if rss_ratio <= 1.1 else "MISSED")]
        )  # fmt: skip
        for label, before, now in (
            ("added TTFT p50 ms", fresh.added_p50, after.added_p50),
            ("added TTFT p99 ms", fresh.added_p99, after.added_p99),
        ):
            ratio = statistics.median(now) / statistics.median(before)
            goal = "≤ 1.10 " + ("held" if ratio <= 1.1 else "MISSED") if "p50" in label else "—"
            rows.append(["", label, spread(before), spread(now), f"{ratio:.2f}", goal])
    print_table(columns, rows)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--probe-calls", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    add_source_argument(parser)
    asyncio.run(main(parser.parse_args()))
