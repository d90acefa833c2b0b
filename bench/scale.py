"""Scale: thousands of concurrent paced streams, and how late their tokens arrive.

Each stream asks the simulator for `rate * seconds` tokens at `1000 / rate` ms
between tokens (labels `tokenwire.sim/answer-tokens`, `ttft-ms`,
`inter-token-ms`), STREAM mode, server-default chunking. A token's *added
delay* is its arrival at the client minus its place in the schedule
(request start + ttft + i * interval); every token of a coalesced chunk counts
with the chunk's arrival. That is the latency a user watching the stream sees
on top of the model's own pace, so it is the figure the target is about.

The server is a `tokenwire serve` subprocess (a fresh one per stream count, so
its peak RSS is that run's); the load comes from `--procs` client processes,
each with its own asyncio loop and `--channels` gRPC connections, so one
Python client's GIL is not the bottleneck. Stream starts are spread evenly
over `--ramp` seconds: real streams do not all tick on the same millisecond.

Checked per stream: sequences contiguous from 1, offsets contiguous, tokens
counted, `Completed.chunk_count`/`last_sequence` and the final SHA-256 against
the reassembled text. Columns: added delay p50/p99/max, and its p99 up to the
chunk's `emitted_at` (the server-side part); tokens per chunk (above 1 when a
stream fell behind and coalesced); `lost`, tokens missing from streams that
completed; `disorder`, sequence or offset gaps, wrong counts or digests (both
must be 0); `completed`, streams that ended with `Completed` (the others'
errors are printed below the row); server CPU (utime+stime from /proc, % of
one core over the load, and µs per delivered chunk) and peak RSS (VmHWM);
client CPU (all client processes, % of one core, µs per chunk). With
`--baseline` the same load also runs against `raw_paced_server.py`, bare
grpc.aio on the same schedule: what the stack costs before tokenwire adds any.

    python bench/scale.py [--streams 100 1000 2000] [--seconds 30] [--rate 20]
                          [--procs 4] [--ramp 10] [--baseline] [--plot docs/scale.png]
                          [--repeats 1] [--profile prof.svg]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_message import ROOT, Process

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Load:
    """One run's shape, shared with the client processes."""

    streams: int
    seconds: float
    rate: float
    ttft_ms: float
    ramp: float
    channels: int

    @property
    def tokens(self) -> int:
        return round(self.rate * self.seconds)

    @property
    def interval(self) -> float:
        return 1.0 / self.rate


@dataclass
class WorkerResult:
    """What one client process measured; arrays keep 1M+ values cheap to pickle."""

    request_start: array[float] = field(default_factory=lambda: array("d"))  # per stream
    chunk_stream: array[int] = field(default_factory=lambda: array("i"))  # per chunk, in order
    chunk_arrival: array[float] = field(default_factory=lambda: array("d"))
    chunk_emitted: array[float] = field(default_factory=lambda: array("d"))
    chunk_tokens: array[int] = field(default_factory=lambda: array("i"))
    completed: int = 0
    failed: int = 0
    out_of_order: int = 0
    tokens_short: int = 0
    digest_mismatch: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0


# ----- client process ------------------------------------------------------


def _client_main(
    address: str, load: Load, stream_ids: list[int], ready: Any, go: Any, start_at: Any, out: Any
) -> None:
    """Entry point of one client process (spawned: no gRPC state crosses a fork)."""
    result = asyncio.run(_client(address, load, stream_ids, ready, go, start_at))
    out.put(result)


async def _client(
    address: str, load: Load, stream_ids: list[int], ready: Any, go: Any, start_at: Any
) -> WorkerResult:
    import grpc

    from tokenwire.v1 import respond_pb2 as pb
    from tokenwire.v1 import respond_pb2_grpc

    # A local subchannel pool: otherwise channels with equal arguments share one TCP connection.
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(load.channels)
    ]
    for channel in channels:
        await channel.channel_ready()
    stubs = [respond_pb2_grpc.RespondServiceStub(c) for c in channels]
    request = pb.StreamRespondRequest(
        model="tokenwire-sim",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="scale")],
        params=pb.GenerationParams(max_tokens=load.tokens),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        omit_final_text=True,
        labels={
            "tokenwire.sim/answer-tokens": str(load.tokens),
            "tokenwire.sim/ttft-ms": f"{load.ttft_ms:g}",
            "tokenwire.sim/inter-token-ms": f"{1000 / load.rate:g}",
        },
    )
    # Warm the connections (first-call costs) before the clock starts.
    warm = pb.StreamRespondRequest()
    warm.CopyFrom(request)
    warm.labels["tokenwire.sim/answer-tokens"] = "3"
    warm.labels["tokenwire.sim/inter-token-ms"] = "0"
    warm.params.max_tokens = 3
    for stub in stubs:
        async for _ in stub.StreamRespond(warm, timeout=30):
            pass

    ready.put(os.getpid())
    await asyncio.to_thread(go.wait)
    t0 = start_at.value
    result = WorkerResult()
    result.request_start = array("d", [0.0]) * len(stream_ids)
    per_stream: list[tuple[array[float], array[float], array[int]]] = [
        (array("d"), array("d"), array("i")) for _ in stream_ids
    ]
    cpu_before = _own_cpu()
    timeout = load.ttft_ms / 1000 + load.seconds * 4 + 60

    async def one(slot: int, stream_id: int) -> None:
        arrival, emitted, tokens = per_stream[slot]
        delay = t0 + load.ramp * stream_id / load.streams - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        expected_sequence, offset, token_total = 1, 0, 0
        digest = hashlib.sha256()
        result.request_start[slot] = time.time()
        try:
            call = stubs[stream_id % len(stubs)].StreamRespond(request, timeout=timeout)
            async for event in call:
                now = time.time()
                if event.HasField("chunk"):
                    chunk = event.chunk
                    if chunk.sequence != expected_sequence or chunk.text_offset != offset:
                        result.out_of_order += 1
                    expected_sequence = chunk.sequence + 1
                    data = chunk.text.encode()
                    offset = chunk.text_offset + len(data)
                    digest.update(data)
                    token_total += chunk.token_count
                    arrival.append(now)
                    emitted.append(chunk.emitted_at.seconds + chunk.emitted_at.nanos / 1e9)
                    tokens.append(chunk.token_count)
                elif event.HasField("completed"):
                    done = event.completed
                    if done.chunk_count != len(arrival) or done.last_sequence != len(arrival):
                        result.out_of_order += 1
                    if done.final_sha256 != digest.hexdigest():
                        result.digest_mismatch += 1
            if token_total != load.tokens:
                result.tokens_short += load.tokens - token_total
            result.completed += 1
        except Exception as error:  # counted and reported, never hidden
            result.failed += 1
            code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else ""
            if len(result.errors) < 5:
                result.errors.append(
                    f"{code or type(error).__name__} {str(error)[-120:]!r} after "
                    f"{time.time() - result.request_start[slot]:.1f} s, {token_total} tokens"
                )

    await asyncio.gather(*(one(slot, sid) for slot, sid in enumerate(stream_ids)))
    result.cpu_seconds = _own_cpu() - cpu_before
    for slot, (arrival, emitted, tokens) in enumerate(per_stream):
        result.chunk_stream.extend([slot] * len(arrival))
        result.chunk_arrival.extend(arrival)
        result.chunk_emitted.extend(emitted)
        result.chunk_tokens.extend(tokens)
    for channel in channels:
        await channel.close()
    return result


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----- server measurements --------------------------------------------------


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# ----- one run --------------------------------------------------------------


@dataclass
class RunResult:
    kind: str
    streams: int
    delays_ms: np.ndarray  # per token: arrival - schedule
    server_ms: np.ndarray  # per token: chunk emission - schedule (the server-side part)
    completed: int
    failed: int
    out_of_order: int
    tokens_short: int
    digest_mismatch: int
    tokens_per_chunk: float
    server_cpu_pct: float
    server_us_per_chunk: float
    client_us_per_chunk: float
    server_rss_mib: float
    client_cpu_pct: float
    wall: float
    load_avg: str
    errors: list[str]


async def start_server(kind: str, load: Load, log: Path | None) -> Process:
    """`tokenwire serve` as the other benchmarks start it (simulator, no audit file,
    quiet logs), with room for every stream; or the bare grpc.aio baseline.
    Server stderr goes to `log` so a failed run can be explained."""
    if kind == "raw":
        command = [sys.executable, str(ROOT / "bench" / "raw_paced_server.py")]
    else:
        command = [
            *(sys.executable, "-m", "tokenwire_server", "--port", "0"),
            *("--audit-path", ":memory:", "--log-level", "WARNING"),
            *("--max-concurrent-calls", str(load.streams + 100)),
            *("--max-tokens-cap", str(max(load.tokens, 4096))),
        ]
    stderr = log.open("ab") if log is not None else asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=ROOT
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    match = re.search(r"serving on (\S+):(\d+)", line)
    if not match:
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return Process(process, f"127.0.0.1:{match.group(2)}")


async def run(
    kind: str, load: Load, procs: int, profile: str | None, log: Path | None
) -> RunResult:
    server = await start_server(kind, load, log)
    pid = server.process.pid
    profiler: asyncio.subprocess.Process | None = None
    try:
        ctx = mp.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        start_at = ctx.Value("d", 0.0)
        shares = [list(range(i, load.streams, procs)) for i in range(procs)]
        workers = [
            ctx.Process(
                target=_client_main,
                args=(server.address, load, share, ready, go, start_at, out),
                daemon=True,
            )
            for share in shares
            if share
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            await asyncio.to_thread(ready.get, True, 120)
        load_avg = [f"{x:.2f}" for x in os.getloadavg()]
        start_at.value = time.time() + 0.2
        cpu_before = _server_cpu(pid)
        wall_before = time.time()
        go.set()
        if profile:
            profiler = await asyncio.create_subprocess_exec(
                *("py-spy", "record", "-p", str(pid), "-o", profile, "-r", "50", "--nonblocking"),
                *("-d", str(int(load.ramp + load.seconds)), "-f", _profile_format(profile)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        results: list[WorkerResult] = [
            await asyncio.to_thread(out.get, True, load.seconds * 5 + 120) for _ in workers
        ]
        wall = time.time() - wall_before
        server_cpu = _server_cpu(pid) - cpu_before
        rss = _status_kib(pid, "VmHWM") / 1024
        for worker in workers:
            await asyncio.to_thread(worker.join, 30)
        if profiler is not None:
            await asyncio.wait_for(profiler.wait(), 120)
    finally:
        server.process.terminate()
        await server.process.wait()
    delays, server_part = _token_delays(results, load)
    chunks = sum(len(r.chunk_arrival) for r in results)
    return RunResult(
        kind=kind,
        streams=load.streams,
        delays_ms=delays,
        server_ms=server_part,
        completed=sum(r.completed for r in results),
        failed=sum(r.failed for r in results),
        out_of_order=sum(r.out_of_order for r in results),
        tokens_short=sum(r.tokens_short for r in results),
        digest_mismatch=sum(r.digest_mismatch for r in results),
        tokens_per_chunk=len(delays) / max(1, chunks),
        server_cpu_pct=100 * server_cpu / wall,
        server_us_per_chunk=1e6 * server_cpu / max(1, chunks),
        client_us_per_chunk=1e6 * sum(r.cpu_seconds for r in results) / max(1, chunks),
        server_rss_mib=rss,
        client_cpu_pct=100 * sum(r.cpu_seconds for r in results) / wall,
        wall=wall,
        load_avg=" ".join(load_avg),
        errors=[e for r in results for e in r.errors],
    )


def _profile_format(path: str) -> str:
    return {".json": "speedscope", ".txt": "raw"}.get(Path(path).suffix, "flamegraph")


def _token_delays(results: list[WorkerResult], load: Load) -> tuple[np.ndarray, np.ndarray]:
    """Per token (ms): arrival - schedule, and the chunk's emission - schedule."""
    delays, server_part = [], []
    for r in results:
        if not r.chunk_arrival:
            continue
        stream = np.frombuffer(r.chunk_stream, dtype=np.int32)
        counts = np.frombuffer(r.chunk_tokens, dtype=np.int32)
        arrival = np.frombuffer(r.chunk_arrival, dtype=np.float64)
        emitted = np.frombuffer(r.chunk_emitted, dtype=np.float64)
        starts = np.frombuffer(r.request_start, dtype=np.float64)
        # Token index of each token: running count within its stream (chunks are in stream order).
        per_token_stream = np.repeat(stream, counts)
        per_token_arrival = np.repeat(arrival, counts)
        per_token_emitted = np.repeat(emitted, counts)
        first_of_stream = np.searchsorted(per_token_stream, per_token_stream, side="left")
        index = np.arange(len(per_token_stream)) - first_of_stream
        schedule = starts[per_token_stream] + load.ttft_ms / 1000 + index * load.interval
        delays.append((per_token_arrival - schedule) * 1000)
        server_part.append((per_token_emitted - schedule) * 1000)
    if not delays:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(delays), np.concatenate(server_part)


# ----- report ---------------------------------------------------------------


HEADER = (
    f"{'server':>9} | {'streams':>7} | {'tokens/s':>8} | {'added p50':>9} | {'p99':>9} | "
    f"{'max':>8} | {'server-side p99':>15} | {'tokens/chunk':>12} | {'lost':>4} | "
    f"{'disorder':>8} | "
    f"{'completed':>9} | {'server CPU':>10} | {'µs/chunk':>8} | {'peak RSS':>8} | "
    f"{'client CPU':>10} | {'µs/chunk':>8} | load avg"
)


def row(results: list[RunResult], load: Load) -> str:
    """A table row: the median over repeats of each figure (the worst for correctness)."""

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def pct(values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")

    lost = max(r.tokens_short for r in results)
    disorder = max(r.out_of_order + r.digest_mismatch for r in results)
    completed = min(r.completed for r in results)
    return (
        f"{results[0].kind:>9} | {load.streams:>7} | {load.streams * load.rate:>8,.0f} | "
        f"{med([pct(r.delays_ms, 50) for r in results]):>6.1f} ms | "
        f"{med([pct(r.delays_ms, 99) for r in results]):>6.1f} ms | "
        f"{med([pct(r.delays_ms, 100) for r in results]):>5.0f} ms | "
        f"{med([pct(r.server_ms, 99) for r in results]):>12.1f} ms | "
        f"{med([r.tokens_per_chunk for r in results]):>12.2f} | {lost:>4} | {disorder:>8} | "
        f"{completed:>4}/{load.streams:<4} | "
        f"{med([r.server_cpu_pct for r in results]):>8.0f} % | "
        f"{med([r.server_us_per_chunk for r in results]):>8.0f} | "
        f"{med([r.server_rss_mib for r in results]):>4.0f} MiB | "
        f"{med([r.client_cpu_pct for r in results]):>8.0f} % | "
        f"{med([r.client_us_per_chunk for r in results]):>8.0f} | "
        + "; ".join(r.load_avg for r in results)
    )


def plot(
    runs: dict[tuple[str, int], list[RunResult]], path: Path, load: Load, target: float
) -> None:
    """CDF of added delay per stream count (log x): the tail is what the target is about."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({streams for _, streams in runs})
    for (kind, streams), results in sorted(runs.items()):
        delays = np.sort(np.concatenate([r.delays_ms for r in results]))
        if not len(delays):
            continue
        y = np.arange(1, len(delays) + 1) / len(delays)
        ax.plot(
            np.clip(delays, 0.01, None),
            y,
            color=colours[sizes.index(streams) % len(colours)],
            linestyle="-" if kind == "tokenwire" else "--",
            label=f"{kind}, {streams} streams ({min(r.completed for r in results)} completed)",
        )
    ax.axvline(target, color="grey", linestyle=":", linewidth=1, label=f"target p99 {target:g} ms")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("added delay per delivered token: arrival - schedule (ms, log scale)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(
        f"StreamRespond, {load.rate:g} tokens/s per stream for {load.seconds:g} s "
        f"({os.cpu_count()} shared cores, client included)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot: {path}")


async def main(args: argparse.Namespace) -> None:
    print(
        f"scale: {args.rate:g} tokens/s per stream for {args.seconds:g} s, ttft {args.ttft_ms:g} "
        f"ms, starts spread over {args.ramp:g} s, {args.procs} client processes x "
        f"{args.channels} channels, {os.cpu_count()} cores shared by server and client; "
        f"median of {args.repeats}\n"
    )
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    runs: dict[tuple[str, int], list[RunResult]] = {}
    kinds = ["tokenwire", "raw"] if args.baseline else ["tokenwire"]
    log = Path(args.server_log) if args.server_log else None
    last = None
    for streams in args.streams:
        load = Load(streams, args.seconds, args.rate, args.ttft_ms, args.ramp, args.channels)
        last = load
        for kind in kinds:
            results = []
            for repeat in range(args.repeats):
                profile = None
                if args.profile and kind == "tokenwire" and streams == max(args.streams):
                    profile = args.profile if repeat == 0 else None
                results.append(await run(kind, load, args.procs, profile, log))
            runs[kind, streams] = results
            print(row(results, load), flush=True)
            for r in results:
                for error in r.errors[:3]:
                    print(f"    ({r.failed} failed streams) {error}")
    if args.plot and last is not None:
        plot(runs, Path(args.plot), last, args.target_p99)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 1000, 2000])
    parser.add_argument("--seconds", type=float, default=30.0, help="generation time per stream")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="simulated time to 1st token")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which streams start")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--channels", type=int, default=4, help="connections per client process")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size; medians reported")
    parser.add_argument(
        "--baseline", action="store_true", help="also run bare grpc.aio (raw_paced_server.py)"
    )
    parser.add_argument("--plot", default=str(ROOT / "docs" / "scale.png"), help="PNG path")
    parser.add_argument("--target-p99", type=float, default=25.0, help="ms, drawn on the plot")
    parser.add_argument("--profile", help="py-spy the largest run into this file (.svg/.json)")
    parser.add_argument("--server-log", help="append the servers' stderr to this file")
    asyncio.run(main(parser.parse_args()))
