"""The real path: what tokenwire adds in front of an OpenAI-compatible upstream.

Starts a fake OpenAI-compatible upstream (bench/fake_openai.py, zero delay,
one token per SSE event) and two `tokenwire serve` processes routed to it:
one with the pass-through policy, one with `builtin:default` (every built-in
detector). Both run as a deployment would: spans exported over OTLP/HTTP (to
a second fake process's drop-everything `/v1/traces`, standing in for a
collector), the Prometheus endpoint on, INFO logs to /dev/null. Then,
alternating between the three paths, `--repeats` times:

* the upstream read directly by an async Python SSE client (aiohttp): the
  ceiling of this machine's client side;
* tokenwire `StreamRespond` (STREAM mode) read by a grpc.aio client, per policy.

For each path: time to first token p50/p99 over `--ttft-requests` sequential
requests (and the difference to the direct read), tokens/s delivered at 1 and
16 concurrent streams of `--tokens` tokens, and tokenwire's own CPU per 1,000
tokens (utime+stime from /proc/PID/stat over the throughput runs). Medians
with min-max over the repeats. Every tokenwire stream is checked: sequences
1..n, offsets contiguous, the reassembled text hashes to
`Completed.final_sha256` and equals the text the upstream sent, after
redaction: the answer carries an email address split across three tokens
(and across network reads where they fall), and the governed stream must
equal the same policy applied to the whole text at once. A failed check
aborts the run.

`--tokenwire-src DIR` (repeatable) runs the two servers of each named checkout
(a `git worktree` of another commit) in the same run, alternating with the rest.

    python bench/upstream_path.py [--repeats 3] [--tokens 256] [--ttft-requests 200]
                                  [--streams 1 16] [--tokenwire-src DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import answer
from per_message import (
    ROOT,
    Process,
    add_source_argument,
    percentile,
    print_table,
    source_label,
    start,
    start_tokenwire,
)

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire_server.governance.holder import PolicyHolder

MODEL = "fake"


@dataclass
class Figures:
    """One path's measurements over the repeats."""

    ttft_p50: list[float] = field(default_factory=list)
    ttft_p99: list[float] = field(default_factory=list)
    rate: dict[int, list[float]] = field(default_factory=dict)
    cpu_per_1k: list[float] = field(default_factory=list)


class DirectPath:
    """The upstream read straight over SSE: one aiohttp session, parse every event."""

    name = "direct SSE"

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/chat/completions"
        self.session = aiohttp.ClientSession()

    async def stream(self, tokens: int, on_first: Callable[[], None]) -> int:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "bench"}],
            "max_tokens": tokens,
            "stream": True,
        }
        received = 0
        async with self.session.post(self.url, json=body) as response:
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                for choice in json.loads(data).get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        if received == 0:
                            on_first()
                        received += 1
        if received != tokens:
            raise AssertionError(f"direct read got {received} of {tokens} tokens")
        return received

    async def aclose(self) -> None:
        await self.session.close()


def governed(text: str, policy: str) -> str:
    """What `policy` makes of `text` seen whole: the streamed answer must match it."""
    session = PolicyHolder.from_source(policy).current.open_session()
    released, _ = session.push(text)
    tail, _, decision = session.finish()
    return decision.text if decision.text is not None else released + tail


class TokenwirePath:
    """tokenwire StreamRespond over one grpc.aio channel, every stream checked."""

    def __init__(self, name: str, server: Process, policy: str | None = None) -> None:
        self.name = name
        self.server = server
        self.policy = policy
        self._expected: dict[int, str] = {}
        self.channel = grpc.aio.insecure_channel(server.address)
        self.stub = respond_pb2_grpc.RespondServiceStub(self.channel)

    async def stream(self, tokens: int, on_first: Callable[[], None]) -> int:
        request = pb.StreamRespondRequest(
            model=MODEL,
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content="bench")],
            params=pb.GenerationParams(max_tokens=tokens),
            delivery_mode=pb.DELIVERY_MODE_STREAM,
        )
        parts: list[str] = []
        sequence = offset = 0
        completed: pb.Completed | None = None
        async for event in self.stub.StreamRespond(request, timeout=120):
            kind = event.WhichOneof("event")
            if kind == "chunk":
                chunk = event.chunk
                if not parts:
                    on_first()
                sequence += 1
                if chunk.sequence != sequence or chunk.text_offset != offset:
                    raise AssertionError(f"{self.name}: chunk {chunk.sequence} out of order")
                parts.append(chunk.text)
                offset += len(chunk.text.encode())
            elif kind == "completed":
                completed = event.completed
        text = "".join(parts)
        if completed is None:
            raise AssertionError(f"{self.name}: no Completed")
        if hashlib.sha256(text.encode()).hexdigest() != completed.final_sha256:
            raise AssertionError(f"{self.name}: reassembled text does not match final_sha256")
        if text != self.expected(tokens):
            raise AssertionError(f"{self.name}: text differs from what the upstream sent")
        return tokens

    def expected(self, tokens: int) -> str:
        if tokens not in self._expected:
            sent = answer(tokens)
            self._expected[tokens] = governed(sent, self.policy) if self.policy else sent
        return self._expected[tokens]

    async def aclose(self) -> None:
        await self.channel.close()


Path_ = DirectPath | TokenwirePath


async def time_to_first_token(path: Path_, requests: int, tokens: int = 16) -> list[float]:
    """Milliseconds to the first token of each of `requests` sequential answers."""
    samples: list[float] = []
    for _ in range(requests):
        started = time.perf_counter()
        first: list[float] = []
        await path.stream(tokens, lambda first=first: first.append(time.perf_counter()))
        samples.append((first[0] - started) * 1000)
    return samples


async def tokens_per_second(path: Path_, streams: int, tokens: int, seconds: float) -> float:
    """Tokens/s delivered over about `seconds`, `streams` loops of whole answers."""
    deadline = time.perf_counter() + seconds

    async def loop() -> int:
        total = 0
        while time.perf_counter() < deadline:
            total += await path.stream(tokens, lambda: None)
        return total

    started = time.perf_counter()
    counts = await asyncio.gather(*(loop() for _ in range(streams)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(path: Path_, figures: Figures, args: argparse.Namespace) -> None:
    ttft = await time_to_first_token(path, args.ttft_requests)
    figures.ttft_p50.append(percentile(ttft, 0.50))
    figures.ttft_p99.append(percentile(ttft, 0.99))
    server = path.server if isinstance(path, TokenwirePath) else None
    cpu_before = server.cpu_seconds() if server else 0.0
    tokens = 0.0
    elapsed = 0.0
    for streams in args.streams:
        started = time.perf_counter()
        rate = await tokens_per_second(path, streams, args.tokens, args.seconds)
        took = time.perf_counter() - started
        figures.rate.setdefault(streams, []).append(rate)
        tokens += rate * took
        elapsed += took
    if server:
        figures.cpu_per_1k.append((server.cpu_seconds() - cpu_before) / tokens * 1000 * 1000)


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    median = statistics.median(values)
    return f"{median:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


async def main(args: argparse.Namespace) -> None:
    upstream = await start(sys.executable, str(ROOT / "bench" / "fake_openai.py"))
    # Why the span sink has a process of its own: docs/performance.md, "in code comments".
    collector = await start(sys.executable, str(ROOT / "bench" / "fake_openai.py"))
    base_url = f"http://{upstream.address}/v1"
    deployment = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{collector.address}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    common = (
        "--upstream-url", base_url, "--upstream-model", MODEL,
        "--metrics-port", "0", "--log-level", "INFO", "--max-tokens-cap", "100000",
    )  # fmt: skip
    sources: list[Path | None] = list(args.tokenwire_src) or [None]
    servers: list[Process] = []
    paths: list[Path_] = [DirectPath(base_url)]
    for source in sources:
        label = f" [{source_label(source)}]" if args.tokenwire_src else ""
        passthrough = await start_tokenwire(*common, env=deployment, source=source)
        governed_server = await start_tokenwire(
            *common, "--policy", "builtin:default", env=deployment, source=source
        )
        servers += [passthrough, governed_server]
        paths += [
            TokenwirePath(f"tokenwire pass-through{label}", passthrough),
            TokenwirePath(f"tokenwire default policy{label}", governed_server, "builtin:default"),
        ]
    figures = {path.name: Figures() for path in paths}
    try:
        for path in paths:  # warm up connections, caches and imports
            await path.stream(args.tokens, lambda: None)
        for repeat in range(args.repeats):
            for path in paths:
                await measure(path, figures[path.name], args)
            print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        for path in paths:
            await path.aclose()
        for server in (*servers, upstream, collector):
            server.process.terminate()
            await server.process.wait()
    report(figures, args)


def report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    direct = figures[DirectPath.name]
    print(
        f"\nreal path: fake OpenAI upstream at zero delay, {args.tokens} tokens per answer, "
        f"median (min-max) of {args.repeats} alternating runs, {os.cpu_count()} cores, loopback\n"
    )
    columns = ["path", "TTFT p50 ms", "added p50", "TTFT p99 ms", "added p99"]
    columns += [f"tok/s @{s}" for s in args.streams] + ["CPU ms/1k tok"]
    rows = []
    for name, f in figures.items():
        added50 = [a - b for a, b in zip(f.ttft_p50, direct.ttft_p50, strict=True)]
        added99 = [a - b for a, b in zip(f.ttft_p99, direct.ttft_p99, strict=True)]
        is_direct = f is direct
        rows.append(
            [
                name,
                spread(f.ttft_p50, ".2f"),
                "—" if is_direct else spread(added50, ".2f"),
                spread(f.ttft_p99, ".2f"),
                "—" if is_direct else spread(added99, ".2f"),
                *(spread(f.rate[s], ",.0f") for s in args.streams),
                "—" if is_direct else spread(f.cpu_per_1k, ".1f"),
            ]
        )
    print_table(columns, rows)
    print(
        "\nall tokenwire streams: sequences 1..n, offsets contiguous, sha256 = final_sha256,"
        " text = what the upstream sent (default policy: = the policy over the whole text)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per answer")
    parser.add_argument("--ttft-requests", type=int, default=200)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    add_source_argument(parser)
    asyncio.run(main(parser.parse_args()))
