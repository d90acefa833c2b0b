"""Memory that stays flat (issue 24 point 4): a fresh server, then the same after many calls.

Starts the zero-delay fake OpenAI upstream, the fake OTLP collector and, per
tokenwire source, one `tokenwire serve` as deployed (bench/floor.py: spans
exported, SQLite audit file, INFO logs, /metrics on). Then:

1. fresh: after `--warmup` calls, `--blocks` blocks of `--probe-calls`
   sequential 256-token calls, the upstream read directly and through each
   server interleaved call by call: added time to first token (p50, p99 of
   the server's samples minus the direct read's, all blocks pooled) and the
   server's RSS (VmRSS);
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
    """One phase's probes of one server: TTFT samples per block, RSS at the end."""

    own: list[list[float]] = field(default_factory=list)
    direct: list[list[float]] = field(default_factory=list)
    rss: int = 0

    def added(self, q: float) -> tuple[float, list[float]]:
        """Added TTFT at quantile q over every block's samples pooled, and per block."""

        def pooled(blocks: list[list[float]]) -> float:
            return percentile([v for b in blocks for v in b], q)

        pairs = zip(self.own, self.direct, strict=True)
        per_block = [percentile(a, q) - percentile(b, q) for a, b in pairs]
        return pooled(self.own) - pooled(self.direct), per_block


@dataclass
class Subject:
    name: str
    server: Process
    path: TokenwirePath
    phases: dict[str, Phase] = field(default_factory=dict)


async def first_token_ms(path: DirectPath | TokenwirePath) -> float:
    return (await time_to_first_token(path, 1, TOKENS))[0]


async def probe(
    direct: DirectPath, subjects: list[Subject], phase: str, args: argparse.Namespace
) -> None:
    """`--blocks` blocks of `--probe-calls` calls, the direct read and every server
    interleaved call by call, so each meets the same moments of the machine."""
    for subject in subjects:
        subject.phases[phase] = Phase()
    for _ in range(args.blocks):
        base: list[float] = []
        own: dict[str, list[float]] = {s.name: [] for s in subjects}
        for _ in range(args.probe_calls):
            base.append(await first_token_ms(direct))
            for subject in subjects:
                own[subject.name].append(await first_token_ms(subject.path))
        for subject in subjects:
            subject.phases[phase].own.append(own[subject.name])
            subject.phases[phase].direct.append(base)
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
        f"({args.concurrency} at a time); added TTFT = the server's minus the direct read's, "
        f"{args.blocks} blocks of {args.probe_calls} sequential calls interleaved call by call, "
        f"pooled (min-max per block); {os.cpu_count()} cores, loopback; load average "
        f"{os.getloadavg()[0]:.1f} at the end\n"
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
        for label, q in (("added TTFT p50 ms", 0.50), ("added TTFT p99 ms", 0.99)):
            before, before_blocks = fresh.added(q)
            now, now_blocks = after.added(q)
            ratio = now / before if before > 0 else float("nan")
            goal = "—"
            if "p50" in label:
                goal = "≤ 1.10 " + ("held" if ratio <= 1.1 else "MISSED")
                if before <= 0:
                    goal = "no verdict: fresh figure not above zero (noise)"
            rows.append(
                ["", label, spread(before_blocks, before), spread(now_blocks, now),
                 f"{ratio:.2f}", goal]
            )  # fmt: skip
    print_table(columns, rows)


def spread(values: list[float], middle: float) -> str:
    return f"{middle:.2f} ({min(values):.2f}-{max(values):.2f})"


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
