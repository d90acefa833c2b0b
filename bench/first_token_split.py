"""Where a first token's time goes: before the upstream request arrives, and after.

bench/floor.py says how much later tokenwire's first token is than the bare
relay's; this says on which side of the upstream the difference lies. The
fake upstream (bench/fake_openai.py --stamp-arrival) puts the moment each
request reached it (`time.perf_counter_ns()`, CLOCK_MONOTONIC, the client's
clock too on one machine) in front of the answer's first token, so each
call splits into *to the upstream* (client start -> request arrives: the
server's own work before it calls out) and *back* (arrival -> first chunk at
the client: the upstream's answer, parsing, governance, the first write).

Paths: the bare relay (bench/bare_relay.py) and tokenwire as deployed (spans
over OTLP/HTTP, SQLite audit file, INFO logs; per `--tokenwire-src`), in
front of the same upstream. Quiet: `--calls` sequential calls per round,
interleaved call by call across the paths, 16-token answers. With
`--load-streams N`, each path in turn also while N streams of 256-token
answers run against it (bench/floor.py's load process). p50s over all
rounds' calls (the first 20 of each round dropped); x: ratio to the bare
relay in the same run.

    python bench/first_token_split.py [--rounds 2] [--calls 300] [--load-streams 16]
                                      [--tokenwire-src DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import floor
import per_message
from per_message import (
    ROOT,
    Process,
    add_source_argument,
    percentile,
    print_table,
    start,
    start_all,
    stop_all,
)
from upstream_path import MODEL

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

WARM_UP = 20


@dataclass
class Probed:
    name: str
    server: Process
    stub: respond_pb2_grpc.RespondServiceStub | None = None
    #: (to the upstream, back, total) in ms, per setting ("quiet", "loaded").
    samples: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)


async def one_call(path: Probed, request: pb.StreamRespondRequest) -> tuple[float, float, float]:
    assert path.stub is not None
    started = time.perf_counter_ns()
    first = arrived = 0
    async for event in path.stub.StreamRespond(request):
        if not first and event.HasField("chunk"):
            first = time.perf_counter_ns()
            arrived = int(event.chunk.text.split()[0])
    if not first:
        raise RuntimeError(f"{path.name}: no chunk")
    return (arrived - started) / 1e6, (first - arrived) / 1e6, (first - started) / 1e6


async def loaded(path: Probed, request: pb.StreamRespondRequest, args: argparse.Namespace) -> None:
    loader = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "floor.py"), "--load-worker", "grpc",
        path.server.address, str(args.load_streams), "256",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert loader.stdout is not None
        if (await asyncio.wait_for(loader.stdout.readline(), 60)).strip() != b"loading":
            raise RuntimeError("the load process did not start")
        await asyncio.sleep(0.3)  # every load stream under way
        calls = [await one_call(path, request) for _ in range(args.calls // 2 + WARM_UP)]
        path.samples.setdefault("loaded", []).extend(calls[WARM_UP:])
    finally:
        loader.terminate()
        await loader.wait()


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-split-"))
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        del os.environ[name]  # the relay exports nothing; deployed sets its own
    fake = str(ROOT / "bench" / "fake_openai.py")
    upstream_process, collector = await start_all(
        start(sys.executable, fake, "--stamp-arrival"), start(sys.executable, fake)
    )
    upstream = floor.Upstream(upstream_process, collector)
    sources: list[Path | None] = list(args.tokenwire_src) or [None]
    relay, *servers = await start_all(
        start(sys.executable, str(ROOT / "bench" / "bare_relay.py"), "--upstream-url",
              upstream.base_url),
        *(
            floor.start_server("deployed", upstream, source, workdir / f"audit-{i}.sqlite3")
            for i, source in enumerate(sources)
        ),
    )  # fmt: skip
    paths = [Probed("bare relay", relay)] + [
        Probed(f"tokenwire deployed [{per_message.source_label(source)}]", server)
        for source, server in zip(sources, servers, strict=True)
    ]
    request = pb.StreamRespondRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="split")],
        params=pb.GenerationParams(max_tokens=16),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
    )
    channels = [grpc.aio.insecure_channel(path.server.address) for path in paths]
    try:
        for path, channel in zip(paths, channels, strict=True):
            path.stub = respond_pb2_grpc.RespondServiceStub(channel)
            for _ in range(WARM_UP):
                await one_call(path, request)
        for round_ in range(args.rounds):
            for call in range(args.calls + WARM_UP):
                for path in paths if call % 2 else paths[::-1]:
                    sample = await one_call(path, request)
                    if call >= WARM_UP:
                        path.samples.setdefault("quiet", []).append(sample)
            if args.load_streams:
                for path in paths:
                    await loaded(path, request, args)
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for channel in channels:
            await channel.close()
        await stop_all([upstream_process, collector, relay, *servers])
    report(paths, args)


def report(paths: list[Probed], args: argparse.Namespace) -> None:
    bare = paths[0]
    rows = []
    for setting in ("quiet", "loaded"):
        for path in paths:
            samples = path.samples.get(setting)
            if not samples:
                continue
            to, back, total = (statistics.median(s[i] for s in samples) for i in range(3))
            base_to, _, base_total = (
                statistics.median(s[i] for s in bare.samples[setting]) for i in range(3)
            )
            totals = [s[2] for s in samples]
            rows.append(
                [
                    f"{path.name}, {setting}",
                    f"{to:.2f}",
                    f"{back:.2f}",
                    f"{total:.2f}",
                    f"{percentile(totals, 0.99):.2f}",
                    f"{to / base_to:.2f}",
                    f"{total / base_total:.2f}",
                ]
            )
    print(
        f"\nfirst token split: {args.rounds} rounds of {args.calls} interleaved calls, 16-token"
        f" answers; loaded: {args.load_streams} streams of 256 tokens beside; ms, p50 unless"
        " noted; x: ratio to the bare relay in the same run\n"
    )
    print_table(
        ["path", "to upstream", "back", "total", "total p99", "x to upstream", "x total"], rows
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300, help="quiet calls per path and round")
    parser.add_argument("--load-streams", type=int, default=0, help="0: quiet calls only")
    add_source_argument(parser)
    asyncio.run(main(parser.parse_args()))
