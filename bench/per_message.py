"""Per-message efficiency: tokenwire StreamRespond vs a bare grpc.aio stream.

Starts both servers as their own processes on loopback, then alternates runs
(one token per chunk, simulator at zero delay) at several stream counts and
prints, per configuration, the median messages/s of each, the ratio
tokenwire/raw, and each server's CPU time per message read from /proc.

Streams are long (1,000 messages each at 64 streams): this is the cost of a
message, not of a call; what a call costs before its first message is
`bench/throughput.py`'s time to first token.

`--floor` adds two more baselines: bare grpc.aio building each message the
way tokenwire's codec does, and building plus checking it the way the gate
does (sequence, offset, SHA-256) — the least the contract costs per message.

`--pin` puts the client on one core and every server on another, so the
ratio is of server CPU per message with the scheduler's placement taken out.

    python bench/per_message.py [--messages 64000] [--streams 1 8 64] [--repeats 3] [--floor]
                                [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    process: asyncio.subprocess.Process
    address: str

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        """VmRSS of the server process (0 once it has exited)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 0


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (nearest rank), as every benchmark reports it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


#: CPUs the servers run on (`--pin`); None leaves placement to the scheduler.
SERVER_CPUS: set[int] | None = None


async def start(*command: str, env: dict[str, str] | None = None) -> Process:
    """A server process that prints `... serving on HOST:PORT` once it listens;
    `env` adds to the inherited environment."""
    cpus = SERVER_CPUS
    process = await asyncio.create_subprocess_exec(
        *command,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    match = re.search(r"serving on (\S+):(\d+)", line)
    if not match:
        raise RuntimeError(f"server did not start: {line!r}")
    return Process(process, f"127.0.0.1:{match.group(2)}")


def source_env(source: Path | None) -> dict[str, str]:
    """The environment that makes `python -m tokenwire_server` run the server and
    client packages of the checkout `source` (a `git worktree` of another commit,
    say) instead of the installed ones; None keeps the installed ones."""
    if source is None:
        return {}
    paths = [str(source / "server"), str(source / "clients" / "python")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths)}


def source_label(source: Path | None) -> str:
    """The checkout's short commit, `+changes` (and the directory's name, so two
    changed checkouts of one commit stay apart) when its work tree differs from it."""
    where = source or ROOT
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "server", "clients"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return where.name
    return commit + (f"+changes ({where.name})" if changed else "")


async def start_all(*starting: Awaitable[Process]) -> list[Process]:
    """Starts processes at once; if any fails, stops those that started and raises."""
    results = await asyncio.gather(*starting, return_exceptions=True)
    started = [r for r in results if isinstance(r, Process)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await stop_all(started)
        raise failed[0]
    return started


async def stop_all(processes: Iterable[Process]) -> None:
    for process in processes:
        if process.process.returncode is None:
            process.process.terminate()
        await process.process.wait()


async def start_tokenwire(
    *flags: str, env: dict[str, str] | None = None, source: Path | None = None
) -> Process:
    """A `tokenwire serve` process as the benchmarks run it: the simulator at zero
    delay, no audit file, quiet logs; `flags` add to or override these; `source`
    runs another checkout's server (`source_env`)."""
    return await start(
        sys.executable,
        "-m",
        "tokenwire_server",
        "--port",
        "0",
        "--sim-time-to-first-token",
        "0",
        "--sim-inter-token-delay",
        "0",
        "--max-tokens-cap",
        "1000000",
        "--audit-path",
        ":memory:",
        "--log-level",
        "WARNING",
        *flags,
        env={**source_env(source), **(env or {})},
    )


def add_source_argument(parser: argparse.ArgumentParser) -> None:
    """`--tokenwire-src DIR`, repeatable: the checkouts whose servers a benchmark runs."""
    parser.add_argument(
        "--tokenwire-src", action="append", default=[], metavar="DIR",
        type=lambda value: Path(value).resolve(),
        help="a checkout (a git worktree of another commit) whose server to run; repeat to "
        "compare commits in one run; default: the installed one",
    )  # fmt: skip


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns separated by `|`, a rule under the header."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def tokenwire_request(messages: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(
        model="tokenwire-sim",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="benchmark")],
        params=pb.GenerationParams(max_tokens=messages),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        labels={"tokenwire.sim/answer-tokens": str(messages)},
    )


def raw_request(messages: int) -> pb.StreamRespondRequest:
    return pb.StreamRespondRequest(labels={"count": str(messages)})


async def measure(
    server: Process,
    make_request: Callable[[int], pb.StreamRespondRequest],
    streams: int,
    messages: int,
) -> tuple[float, float]:
    """Returns (messages/s received by the client, server CPU µs per message)."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        async for _ in stub.StreamRespond(make_request(50)):
            pass

        async def consume() -> int:
            received = 0
            async for _ in stub.StreamRespond(make_request(messages), timeout=300):
                received += 1
            return received

        cpu_before = server.cpu_seconds()
        started = time.perf_counter()
        counts = await asyncio.gather(*(consume() for _ in range(streams)))
        elapsed = time.perf_counter() - started
        cpu = server.cpu_seconds() - cpu_before
    total = sum(counts)
    return total / elapsed, cpu / total * 1e6


async def main(args: argparse.Namespace) -> None:
    global SERVER_CPUS
    if args.pin:
        # The client on the first CPU, every server on the last: each server's
        # threads share one core, so the ratio is of server CPU per message and
        # the scheduler's placement (the main source of run-to-run spread here)
        # drops out. Absolute rates are lower than unpinned.
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs two CPUs")
        os.sched_setaffinity(0, {cpus[0]})
        SERVER_CPUS = {cpus[-1]}
    tokenwire = await start_tokenwire()
    raw_script = str(ROOT / "bench" / "raw_server.py")
    raw = await start(sys.executable, raw_script)
    # The floor: bare grpc.aio building (and checking) each message as tokenwire must.
    floors = (
        [
            ("built", await start(sys.executable, raw_script, "--mode", "built")),
            ("built+checked", await start(sys.executable, raw_script, "--mode", "checked")),
        ]
        if args.floor
        else []
    )
    try:
        print(
            f"per-message efficiency: {args.messages} one-token chunks per configuration, "
            f"median of {args.repeats} alternating runs (loopback, {os.cpu_count()} cores"
            f"{'; client and servers pinned to one core each' if args.pin else ''})\n"
        )
        header = (
            f"{'streams':>7} | {'raw msg/s':>10} | {'tokenwire msg/s':>15} | {'ratio':>5} | "
            f"{'raw CPU µs/msg':>14} | {'tokenwire CPU µs/msg':>20}"
            + "".join(f" | {name + ' ratio':>19}" for name, _ in floors)
        )
        print(header)
        print("-" * len(header))
        for streams in args.streams:
            per_stream = max(args.messages // streams, 200)
            raw_runs, tw_runs = [], []
            floor_runs: list[list[tuple[float, float]]] = [[] for _ in floors]
            for _ in range(args.repeats):
                raw_runs.append(await measure(raw, raw_request, streams, per_stream))
                tw_runs.append(await measure(tokenwire, tokenwire_request, streams, per_stream))
                for runs, (_, server) in zip(floor_runs, floors, strict=True):
                    runs.append(await measure(server, raw_request, streams, per_stream))
            raw_rate = statistics.median(r[0] for r in raw_runs)
            tw_rate = statistics.median(r[0] for r in tw_runs)
            raw_cpu = statistics.median(r[1] for r in raw_runs)
            tw_cpu = statistics.median(r[1] for r in tw_runs)
            floor_cells = "".join(
                f" | {statistics.median(r[0] for r in runs) / raw_rate:>19.2f}"
                for runs in floor_runs
            )
            print(
                f"{streams:>7} | {raw_rate:>10,.0f} | {tw_rate:>15,.0f} | "
                f"{tw_rate / raw_rate:>5.2f} | {raw_cpu:>14.1f} | {tw_cpu:>20.1f}{floor_cells}"
            )
    finally:
        for server in (tokenwire, raw, *(server for _, server in floors)):
            server.process.terminate()
            await server.process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=64000, help="messages per configuration")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure bare grpc.aio building (and checking) each message, against raw",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the client to one core and every server to another (less spread)",
    )
    asyncio.run(main(parser.parse_args()))
