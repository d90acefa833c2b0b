"""The per-call floor (issue 24): what tokenwire adds to a call against the least the stack can do.

Starts, each as its own process on loopback: a zero-delay OpenAI-compatible
upstream (bench/fake_openai.py), a second fake process as the OTLP collector
sink, the bare relay (bench/bare_relay.py: grpc.aio with the contract's shape
and nothing else, plus a bare unary `Respond` answering a prebuilt message),
and per tokenwire source two `tokenwire serve` processes routed to the
upstream:

* deployed: spans exported over OTLP/HTTP to the sink, the audit trail in a
  SQLite file, INFO JSON logs (to /dev/null), `/metrics` on;
* minimal: no span export, audit in memory, WARNING logs, no `/metrics`.

Then `--rounds` alternating rounds (the order of the paths rotates each round):

1. Time to first token, `--calls` sequential calls on one channel per answer
   size (`--sizes`, 16 and 256 tokens): the upstream read directly over SSE
   (aiohttp), the bare relay, each tokenwire (STREAM mode, default chunking).
   Added = a path's p50/p99 minus the direct read's in the same round.
2. The same (`--load-calls` calls) while `--load-streams` other streams of
   256-token answers run back to back against the same path (a separate load
   process).
3. Unary `Respond` (echo model, a two-token answer) at each of `--inflight`
   calls in flight for `--unary-seconds`, driven by ghz (Go, so the client is
   not a Python bottleneck; a grpc.aio client in its own process without it),
   req/s and the server's CPU per call (utime+stime from /proc/PID/stat):
   the bare unary server against each tokenwire.

Every streamed answer is checked (sequences, offsets, SHA-256, text equal to
what the upstream sent). The table gives medians over the rounds with min-max,
each tokenwire figure's ratio to the bare relay / bare unary (median of the
per-round ratios, with their range) and issue 24's targets for the deployed
server: added TTFT <= 1.25x the bare relay at p50, <= 1.5x at p99, <= 1.5x at
p50 under load; unary req/s >= 0.5x, CPU per call <= 2x.

`--tokenwire-src DIR` (repeatable) runs the server of another checkout (a
`git worktree add /tmp/tw-base COMMIT`) in the same run, to A/B two commits.
Figures and their history: docs/performance.md#the-per-call-floor-issue-24.

    python bench/floor.py [--rounds 5] [--calls 200] [--sizes 16 256] [--load-streams 16]
                          [--load-calls 100] [--inflight 1 32] [--unary-seconds 3]
                          [--tokenwire-src DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import per_message
from per_message import ROOT, Process, percentile, start, start_all, stop_all
from serving import until_signalled
from upstream_path import MODEL, DirectPath, TokenwirePath, time_to_first_token

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

ECHO_PROMPT = "short ok"  # the echo model at 4 characters a token: a two-token answer
UNARY_JSON = json.dumps(
    {
        "model": "echo",
        "messages": [{"role": "ROLE_USER", "content": ECHO_PROMPT}],
        "params": {"maxTokens": 16},
    }
)
PROTO = ROOT / "protos" / "tokenwire" / "v1" / "respond.proto"
BENCH = ROOT / "bench"

#: (metric, target ratio, True when the ratio must be at most the target)
TARGETS = {
    "ttft p50": (1.25, True),
    "ttft p99": (1.5, True),
    "loaded ttft p50": (1.5, True),
    "req/s": (0.5, False),
    "CPU ms/call": (2.0, True),
}


@dataclass
class Target:
    """One path under test: the direct read, the bare relay or a tokenwire server."""

    name: str
    path: DirectPath | TokenwirePath
    server: Process | None  # None: the direct read
    baseline: bool = False  # the bare relay / bare unary server


def unary_request() -> pb.RespondRequest:
    return pb.RespondRequest(
        model="echo",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=ECHO_PROMPT)],
        params=pb.GenerationParams(max_tokens=16),
    )


# ---- helper processes: load and unary clients ------------------------------------------


async def load_worker(kind: str, address: str, streams: int, tokens: int) -> None:
    """`streams` back-to-back 256-token answers from `address` until SIGTERM, read
    without checks so the load costs its own process little; prints `loading`."""
    if kind == "direct":
        session = aiohttp.ClientSession()
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "load"}],
            "max_tokens": tokens,
            "stream": True,
        }

        async def one() -> None:
            async with session.post(f"{address}/chat/completions", json=body) as response:
                async for _ in response.content.iter_any():
                    pass

    else:
        channel = grpc.aio.insecure_channel(address)
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        request = pb.StreamRespondRequest(
            model=MODEL,
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content="load")],
            params=pb.GenerationParams(max_tokens=tokens),
            delivery_mode=pb.DELIVERY_MODE_STREAM,
        )

        async def one() -> None:
            async for _ in stub.StreamRespond(request, timeout=120):
                pass

    async def loop() -> None:
        while True:
            await one()

    await one()
    tasks = [asyncio.create_task(loop()) for _ in range(streams)]
    print("loading", flush=True)
    await until_signalled()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await (session.close() if kind == "direct" else channel.close())


async def unary_worker(address: str, inflight: int, seconds: float) -> None:
    """The grpc.aio stand-in for ghz: prints {"ok": calls, "seconds": elapsed}."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = respond_pb2_grpc.RespondServiceStub(channel)
        request = unary_request()
        await stub.Respond(request, timeout=30)
        deadline = time.perf_counter() + seconds

        async def loop() -> int:
            done = 0
            while time.perf_counter() < deadline:
                await stub.Respond(request, timeout=30)
                done += 1
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(loop() for _ in range(inflight)))
        print(json.dumps({"ok": sum(counts), "seconds": time.perf_counter() - started}))


def ghz_binary() -> str | None:
    found = shutil.which("ghz")
    if found:
        return found
    try:
        gopath = subprocess.run(
            ["go", "env", "GOPATH"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    candidate = Path(gopath) / "bin" / "ghz"
    return str(candidate) if candidate.exists() else None


async def run_unary(
    address: str, inflight: int, seconds: float, ghz: str | None
) -> tuple[int, float]:
    """(successful calls, seconds) of one unary load run."""
    if ghz:
        command = [
            ghz, "--insecure", "--proto", str(PROTO), "--import-paths", str(ROOT / "protos"),
            "--call", "tokenwire.v1.RespondService/Respond", "-d", UNARY_JSON,
            "-c", str(inflight), "--connections", "1", "-z", f"{seconds}s",
            "--duration-stop", "wait", "-O", "json",
            address,
        ]  # fmt: skip
    else:
        command = [sys.executable, __file__, "--unary-worker", address, str(inflight)]
        command += [str(seconds)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"unary client failed: {err.decode()[-500:]}")
    report = json.loads(out)
    if not ghz:
        return report["ok"], report["seconds"]
    ok = report.get("statusCodeDistribution", {}).get("OK", 0)
    if ok != report["count"]:
        raise RuntimeError(f"ghz: not every call was OK: {report.get('statusCodeDistribution')}")
    return ok, report["total"] / 1e9


# ---- measurement ------------------------------------------------------------------------


@dataclass
class Figures:
    """Every sample, kept per round."""

    #: (target, "ttft @16" or "loaded ttft @16") -> one list of TTFT ms per round
    ttft: dict[tuple[str, str], list[list[float]]] = field(default_factory=dict)
    #: (target, "req/s @1" or "CPU ms/call @1") -> one value per round
    unary: dict[tuple[str, str], list[float]] = field(default_factory=dict)


async def first_token_ms(target: Target, tokens: int) -> float:
    return (await time_to_first_token(target.path, 1, tokens))[0]


async def ttft_round(targets: list[Target], figures: Figures, args: argparse.Namespace) -> None:
    """`--calls` calls per path and size, interleaved call by call (in `targets`'
    order), so that every path meets the same moments of the machine."""
    for size in args.sizes:
        samples: dict[str, list[float]] = {t.name: [] for t in targets}
        for _ in range(args.calls):
            for target in targets:
                samples[target.name].append(await first_token_ms(target, size))
        for name, values in samples.items():
            figures.ttft.setdefault((name, f"ttft @{size}"), []).append(values)


async def loaded_round(
    target: Target, figures: Figures, args: argparse.Namespace, upstream_url: str
) -> None:
    if target.server is None:
        kind, address = "direct", upstream_url
    else:
        kind, address = "grpc", target.server.address
    loader = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load-worker", kind, address, str(args.load_streams), "256",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert loader.stdout is not None
        line = await asyncio.wait_for(loader.stdout.readline(), 60)
        if line.strip() != b"loading":
            raise RuntimeError(f"load process did not start: {line!r}")
        await asyncio.sleep(0.3)  # every load stream under way
        for size in args.sizes:
            samples = [await first_token_ms(target, size) for _ in range(args.load_calls)]
            figures.ttft.setdefault((target.name, f"loaded ttft @{size}"), []).append(samples)
    finally:
        loader.terminate()
        await loader.wait()


async def unary_round(
    target: Target, figures: Figures, args: argparse.Namespace, ghz: str | None
) -> None:
    assert target.server is not None
    for inflight in args.inflight:
        cpu_before = target.server.cpu_seconds()
        ok, seconds = await run_unary(target.server.address, inflight, args.unary_seconds, ghz)
        cpu = target.server.cpu_seconds() - cpu_before
        figures.unary.setdefault((target.name, f"req/s @{inflight}"), []).append(ok / seconds)
        figures.unary.setdefault((target.name, f"CPU ms/call @{inflight}"), []).append(
            cpu / ok * 1000
        )


def rotated(items: list[Target], by: int) -> list[Target]:
    by %= len(items)
    return items[by:] + items[:by]


@dataclass
class Upstream:
    """The zero-delay fake OpenAI upstream and the fake OTLP collector sink."""

    upstream: Process
    collector: Process

    @property
    def base_url(self) -> str:
        return f"http://{self.upstream.address}/v1"

    @classmethod
    async def start(cls) -> Upstream:
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            del os.environ[name]  # minimal must export nothing; deployed sets its own
        fake = str(BENCH / "fake_openai.py")
        upstream, collector = await start_all(
            start(sys.executable, fake), start(sys.executable, fake)
        )
        return cls(upstream, collector)


async def start_server(
    kind: str, upstream: Upstream, source: Path | None, audit_path: Path
) -> Process:
    """`tokenwire serve` routed to the fake upstream (model `fake`; the simulator's
    `echo` at zero delay beside it), `deployed` or `minimal` as the docstring says."""
    flags = ["--upstream-url", upstream.base_url, "--upstream-model", MODEL]
    flags += ["--max-tokens-cap", "100000"]
    if kind == "minimal":
        return await per_message.start_tokenwire(*flags, source=source)
    deployment = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{upstream.collector.address}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    flags += ["--metrics-port", "0", "--log-level", "INFO", "--audit-path", str(audit_path)]
    return await per_message.start_tokenwire(*flags, env=deployment, source=source)


async def main(args: argparse.Namespace) -> None:
    ghz = None if args.unary_client == "python" else ghz_binary()
    if args.unary_client == "ghz" and ghz is None:
        raise SystemExit("ghz not found: go install github.com/bojand/ghz/cmd/ghz@v0.120.0")
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-floor-"))
    fakes = await Upstream.start()
    base_url = fakes.base_url
    sources: list[Path | None] = list(args.tokenwire_src) or [None]
    labels = [per_message.source_label(source) for source in sources]
    try:
        relay, *servers = await start_all(
            start(
                sys.executable, str(ROOT / "bench" / "bare_relay.py"), "--upstream-url", base_url
            ),
            *(
                start_server(kind, fakes, source, workdir / f"audit-{index}.sqlite3")
                for index, source in enumerate(sources)
                for kind in ("deployed", "minimal")
            ),
        )
    except BaseException:
        await stop_all([fakes.upstream, fakes.collector])
        raise
    processes = [fakes.upstream, fakes.collector, relay, *servers]
    targets = [
        Target("direct", DirectPath(base_url), None),
        Target("bare relay", TokenwirePath("bare relay", relay), relay, baseline=True),
    ]
    for index, label in enumerate(labels):
        for kind, server in zip(
            ("deployed", "minimal"), servers[2 * index : 2 * index + 2], strict=True
        ):
            name = f"tokenwire {kind} [{label}]"
            targets.append(Target(name, TokenwirePath(name, server), server))
    try:
        for target in targets:  # connections, caches, imports; the audit file's first rows
            for _ in range(args.warmup):
                await target.path.stream(256, lambda: None)
        unary_targets = [t for t in targets if t.server is not None]
        if args.inflight and args.warmup:
            for target in unary_targets:
                await run_unary(target.server.address, 4, 0.5, ghz)  # type: ignore[union-attr]
        figures = Figures()
        load_before = os.getloadavg()[0]
        for round_ in range(args.rounds):
            order = rotated(targets, round_)
            await ttft_round(order, figures, args)
            if args.load_streams:
                for target in order:
                    await loaded_round(target, figures, args, base_url)
            if args.inflight:
                for target in rotated(unary_targets, round_):
                    await unary_round(target, figures, args, ghz)
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for target in targets:
            await target.path.aclose()
        await stop_all(processes)
        shutil.rmtree(workdir, ignore_errors=True)
    where = [f"{label} = {source or ROOT}" for label, source in zip(labels, sources, strict=True)]
    where.append(
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    report(figures, targets, args, where, "ghz" if ghz else "grpc.aio client process")


# ---- report ------------------------------------------------------------------------------


def spread(values: list[float], fmt: str, middle: float | None = None) -> str:
    """`middle` (default: the median of `values`) with the range of `values`."""
    middle = statistics.median(values) if middle is None else middle
    return f"{middle:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


@dataclass
class Cell:
    """One path's figure: the headline and the per-round values behind it."""

    value: float
    rounds: list[float]


def ttft_cell(figures: Figures, target: Target, direct: Target, key: str, q: float) -> Cell:
    """The direct read's own TTFT at quantile q; any other path's added TTFT: its
    quantile minus the direct read's, over all rounds' samples pooled."""

    def at(name: str) -> tuple[float, list[float]]:
        rounds = figures.ttft[(name, key)]
        return percentile([v for r in rounds for v in r], q), [percentile(r, q) for r in rounds]

    own, own_rounds = at(target.name)
    if target is direct:
        return Cell(own, own_rounds)
    base, base_rounds = at(direct.name)
    return Cell(own - base, [a - b for a, b in zip(own_rounds, base_rounds, strict=True)])


def rows_of(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(row label, figures key, quantile; 0 for unary rows)."""
    rows = []
    for prefix in ("", "loaded ") if args.load_streams else ("",):
        for size in args.sizes:
            for name, q in (("p50", 0.50), ("p99", 0.99)):
                rows.append((f"{prefix}ttft {name} @{size}", f"{prefix}ttft @{size}", q))
    for inflight in args.inflight:
        for name in (f"req/s @{inflight}", f"CPU ms/call @{inflight}"):
            rows.append((name, name, 0.0))
    return rows


def report(
    figures: Figures,
    targets: list[Target],
    args: argparse.Namespace,
    notes: list[str],
    unary_client: str,
) -> None:
    direct, bare = targets[0], targets[1]
    print(
        f"\nthe per-call floor: {args.rounds} rounds; per round {args.calls} sequential calls "
        f"per path and size, interleaved call by call ({args.load_calls} in a block per path "
        f"beside {args.load_streams} load streams); unary {args.unary_seconds:g} s per run "
        f"({unary_client}); {os.cpu_count()} cores, loopback; {'; '.join(notes)}"
    )
    print(
        "TTFT rows (ms): direct = the upstream's own TTFT; other paths = added over direct, "
        "all rounds' samples pooled (min-max of the per-round figures). Unary rows: median "
        "(min-max) over rounds. x: ratio to the bare relay / bare unary server.\n"
    )
    tokenwire = [t for t in targets if t.server is not None and not t.baseline]
    columns = ["metric", "direct", "bare"]
    columns += [c for t in tokenwire for c in (t.name, "x")] + ["target"]
    rows: list[list[str]] = []
    verdicts: list[str] = []
    for label, key, q in rows_of(args):
        goal = TARGETS.get(label.rsplit(" @", 1)[0])
        if q:
            cells = {t.name: ttft_cell(figures, t, direct, key, q) for t in targets}
            row = [label, spread(cells[direct.name].rounds, ".2f", cells[direct.name].value)]
        else:
            cells = {
                t.name: Cell(
                    statistics.median(figures.unary[(t.name, key)]), figures.unary[(t.name, key)]
                )
                for t in targets
                if t.server is not None
            }
            row = [label, "—"]
        fmt = ",.0f" if label.startswith("req/s") else ".2f"
        base = cells[bare.name]
        row.append(spread(base.rounds, fmt, base.value))
        for target in tokenwire:
            cell = cells[target.name]
            ratio = cell.value / base.value if base.value > 0 else float("nan")
            row += [spread(cell.rounds, fmt, cell.value), f"{ratio:.2f}"]
            if goal and "deployed" in target.name:
                limit, at_most = goal
                held = ratio <= limit if at_most else ratio >= limit
                word = "held" if held else f"MISSED by {abs(ratio / limit - 1):.0%}"
                if base.value <= 0:
                    word = "no verdict: the bare figure is not above zero (noise)"
                sign = "<=" if at_most else ">="
                verdicts.append(
                    f"{target.name}: {label}: {ratio:.2f}x (target {sign} {limit}x): {word}"
                )
        row.append(("≤ " if goal[1] else "≥ ") + f"{goal[0]}x" if goal else "—")
        rows.append(row)
    per_message.print_table(columns, rows)
    print("\nissue 24 targets (deployed server):")
    for verdict in verdicts:
        print("  " + verdict)
    print(
        "\nevery streamed answer checked: sequences 1..n, offsets contiguous, "
        "sha256 = final_sha256, text = what the upstream sent"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        kind, address, streams, tokens = sys.argv[2:6]
        asyncio.run(load_worker(kind, address, int(streams), int(tokens)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--unary-worker":
        address, inflight, seconds = sys.argv[2:5]
        asyncio.run(unary_worker(address, int(inflight), float(seconds)))
    else:
        parser = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--calls", type=int, default=200, help="sequential calls per figure")
        parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256])
        parser.add_argument("--load-streams", type=int, default=16, help="0: no loaded runs")
        parser.add_argument(
            "--load-calls", type=int, default=100, help="sequential calls per loaded figure"
        )
        parser.add_argument(
            "--inflight", type=int, nargs="*", default=[1, 32], help="none: no unary runs"
        )
        parser.add_argument("--unary-seconds", type=float, default=3.0)
        parser.add_argument("--warmup", type=int, default=20, help="256-token calls per path")
        parser.add_argument(
            "--unary-client", choices=("auto", "ghz", "python"), default="auto",
            help="auto: ghz when installed (PATH or $(go env GOPATH)/bin), else grpc.aio",
        )  # fmt: skip
        per_message.add_source_argument(parser)
        asyncio.run(main(parser.parse_args()))
