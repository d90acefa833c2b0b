"""Fault matrix: many concurrent streams through each fault, every stream classified.

    python bench/faults.py [--streams 100] [--only FAULT ...] [--slow-seconds 5] [--markdown]

Each fault gets a fresh `tokenwire serve` process (so its RSS before and after
and its SIGTERM mean something), drives `--streams` concurrent StreamRespond
calls through it with the generated grpc.aio stubs (not the client library,
which would hide the raw events), and classifies every stream:

* completed: exactly one `Completed`, nothing after it, sequences 1..n with no
  gap or repeat, offsets equal to the bytes before, and the reassembled text
  hashing to `final_sha256` (or DIVERGED with a usable `retract_from_sequence`);
* clean status: a non-OK status whose `tokenwire-last-sequence` trailer and
  `ErrorInfo.metadata["lastSequence"]` both equal the last chunk this client
  saw; for faults the client causes itself (cancel, its own deadline) the
  status it observes (CANCELLED, DEADLINE_EXCEEDED) is the clean outcome;
* error without sequence: a non-OK status that does not name the last
  sequence (a proxy's own status, say): not silent, but not resumable exactly;
* silent loss: anything else, e.g. OK without `Completed`, a sequence gap, a
  trailer naming a sequence the client never got;
* reorder: a chunk out of sequence or at the wrong offset;
* divergence without retraction: `Completed` whose digest does not match the
  streamed text without DIVERGED and a valid retraction point.

After the streams, the server must be healthy: no stream left active
(`tokenwire_active_streams` on `/metrics`), no generation left burning CPU,
and a follow-up call completes; RSS (VmRSS from /proc) before, at its peak
and after is reported. The servers run with `--retention 1` so ended
responses (kept 600 s by default for resume) do not count as a leak.
Results and their reading: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import os
import platform
import re
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # imported from tests: the sibling modules live here
    sys.path.insert(0, str(BENCH))

from nginx_proxy import NginxProxy, find_nginx  # noqa: E402
from per_message import Process, start_tokenwire  # noqa: E402

from tokenwire.v1 import respond_pb2 as pb  # noqa: E402
from tokenwire.v1 import respond_pb2_grpc  # noqa: E402

LAST_SEQUENCE_KEY = "tokenwire-last-sequence"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MIB = 1024 * 1024

COMPLETED = "completed"
CLEAN = "clean"
UNSEQUENCED = "unsequenced"
LOSS = "loss"

# ----------------------------------------------------------------------------------------
# The server under test


@dataclass
class Server:
    """One `tokenwire serve` process and its /metrics endpoint."""

    process: Process
    metrics_url: str

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def rss_bytes(self) -> int:
        return self.process.rss_bytes()

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by `name{labels}` as Prometheus prints it."""

        def fetch() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
                body: bytes = reply.read()
                return body.decode()

        samples: dict[str, float] = {}
        for line in (await asyncio.to_thread(fetch)).splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    async def metric(self, name: str) -> float:
        """Sum of all samples of `name` (over its labels)."""
        samples = await self.metrics()
        return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))

    async def stop(self) -> int:
        process = self.process.process
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        return process.returncode if process.returncode is not None else -1


async def start_server(*flags: str) -> Server:
    """A fresh server: the benchmarks' defaults plus /metrics and a short retention."""
    process = await start_tokenwire("--metrics-port", "0", "--retention", "1", *flags)
    assert process.process.stdout is not None
    line = (await asyncio.wait_for(process.process.stdout.readline(), 30)).decode()
    match = re.search(r"metrics on (http://\S+)", line)
    if not match:
        process.process.kill()
        raise RuntimeError(f"no metrics line from tokenwire: {line!r}")
    return Server(process, match.group(1))


class RssSampler:
    """Samples the server's RSS every 50 ms while a fault runs, for the peak."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self.peak = server.rss_bytes()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._server.rss_bytes())
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, self._server.rss_bytes())
        if self._task is not None:
            self._task.cancel()


# ----------------------------------------------------------------------------------------
# One stream, observed raw


@dataclass
class StreamResult:
    """What one stream looked like from the client, and its classification."""

    outcome: str
    code: str
    reason: str = ""
    chunks: int = 0
    tokens: int = 0
    heartbeats: int = 0
    reordered: bool = False
    diverged_unretracted: bool = False
    retracted: bool = False
    detail: str = ""
    #: token_count of each chunk, for coalescing.
    chunk_tokens: list[int] = field(default_factory=list)
    #: Per chunk: server emission time, client receipt time (wall clock), UTF-8 bytes.
    timeline: list[tuple[float, float, int]] = field(default_factory=list)
    #: Wall-clock end of the slow-reading phase (slow consumer only).
    slow_end: float = 0.0


class Assembly:
    """Reassembles a stream from raw events and notes every broken promise."""

    def __init__(self) -> None:
        self.texts: list[bytes] = []
        self.size = 0
        self.last_sequence = 0
        self.tokens: list[int] = []
        self.timeline: list[tuple[float, float, int]] = []
        self.heartbeats = 0
        self.completed: pb.Completed | None = None
        self.after_completed = 0
        self.gap = False
        self.reordered = False
        self.problems: list[str] = []

    def add(self, event: pb.StreamRespondResponse) -> None:
        kind = event.WhichOneof("event")
        if self.completed is not None:
            self.after_completed += 1
            self.problems.append(f"{kind} after Completed")
        if kind == "chunk":
            chunk = event.chunk
            if chunk.sequence <= self.last_sequence:
                self.reordered = True
                self.problems.append(f"sequence {chunk.sequence} after {self.last_sequence}")
            elif chunk.sequence != self.last_sequence + 1:
                self.gap = True
                self.problems.append(f"gap: {chunk.sequence} after {self.last_sequence}")
            if chunk.text_offset != self.size:
                self.reordered = True
                self.problems.append(f"offset {chunk.text_offset} != {self.size}")
            data = chunk.text.encode()
            self.texts.append(data)
            self.size += len(data)
            self.last_sequence = max(self.last_sequence, chunk.sequence)
            self.tokens.append(chunk.token_count)
            self.timeline.append((chunk.emitted_at.ToNanoseconds() / 1e9, time.time(), len(data)))
        elif kind == "completed":
            if self.completed is None:
                self.completed = event.completed
        elif kind == "heartbeat":
            self.heartbeats += 1

    def result(self, outcome: str, code: str, reason: str = "", detail: str = "") -> StreamResult:
        problems = "; ".join(self.problems)
        return StreamResult(
            outcome=outcome,
            code=code,
            reason=reason,
            chunks=len(self.texts),
            tokens=sum(self.tokens),
            heartbeats=self.heartbeats,
            reordered=self.reordered,
            detail="; ".join(p for p in (detail, problems) if p),
            chunk_tokens=list(self.tokens),
            timeline=list(self.timeline),
        )

    def finish_ok(self) -> StreamResult:
        """The call ended with OK: it must carry exactly one verifiable Completed."""
        completed = self.completed
        if completed is None:
            return self.result(LOSS, "OK", detail="OK without Completed")
        if self.gap or self.after_completed:
            return self.result(LOSS, "OK", detail="broken stream before OK")
        if completed.last_sequence != self.last_sequence or completed.chunk_count != len(
            self.texts
        ):
            return self.result(
                LOSS,
                "OK",
                detail=f"Completed names {completed.last_sequence}/{completed.chunk_count} chunks, "
                f"client holds {self.last_sequence}/{len(self.texts)}",
            )
        streamed = b"".join(self.texts)
        if hashlib.sha256(streamed).hexdigest() == completed.final_sha256:
            return self.result(COMPLETED, "OK")
        # Diverged: acceptable only when announced with a retraction that rebuilds the final text.
        verification = completed.verification
        retract = verification.retract_from_sequence
        final = completed.final_text.encode()
        kept = b"".join(self.texts[: max(retract - 1, 0)])
        if (
            verification.status == pb.VERIFICATION_STATUS_DIVERGED
            and 1 <= retract <= len(self.texts) + 1
            and hashlib.sha256(final).hexdigest() == completed.final_sha256
            and final.startswith(kept)
        ):
            result = self.result(COMPLETED, "OK")
            result.retracted = True
            return result
        result = self.result(COMPLETED, "OK", detail="digest mismatch without valid retraction")
        result.diverged_unretracted = True
        return result

    def finish_error(
        self, code: grpc.StatusCode, trailers: Sequence[tuple[str, str | bytes]], client_ended: bool
    ) -> StreamResult:
        """A non-OK end: clean when it names exactly the last sequence this client holds."""
        trailer: str | None = None
        info_sequence: str | None = None
        reason = ""
        for key, value in trailers:
            if key == LAST_SEQUENCE_KEY and isinstance(value, str):
                trailer = value
            elif key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        reason = info.reason
                        info_sequence = info.metadata.get("lastSequence")
        name = code.name
        if self.gap or self.after_completed:
            return self.result(LOSS, name, reason, "broken stream before the status")
        if trailer is not None or info_sequence is not None:
            held = str(self.last_sequence)
            named = {v for v in (trailer, info_sequence) if v is not None}
            if named != {held}:
                # The server says it delivered chunks this client never got (or fewer).
                return self.result(
                    LOSS,
                    name,
                    reason,
                    f"status names sequence {trailer}/{info_sequence}, client holds {held}",
                )
            if trailer is None or info_sequence is None:
                missing = "trailer" if trailer is None else "ErrorInfo lastSequence"
                return self.result(UNSEQUENCED, name, reason, f"no {missing}")
            return self.result(CLEAN, name, reason)
        if client_ended:
            return self.result(CLEAN, name, reason or "client")
        return self.result(UNSEQUENCED, name, reason)


@dataclass
class StreamPlan:
    """How one stream is read: its deadline, pace, and how the client may end it."""

    timeout: float = 60.0
    #: Seconds to wait before each read during `slow_seconds` (a slow consumer).
    read_pause: float = 0.0
    slow_seconds: float = 0.0
    #: Cancel the call once this many chunks arrived (a client going away).
    cancel_after_chunks: int | None = None
    #: Close the whole channel instead of cancelling the call (the TCP connection goes).
    close_channel: bool = False
    #: Statuses that mean "the client ended it itself" (its cancel, its deadline).
    client_codes: frozenset[grpc.StatusCode] = frozenset()


async def observe(
    channel: grpc.aio.Channel,
    request: pb.StreamRespondRequest,
    plan: StreamPlan,
    first_event: asyncio.Event | None = None,
) -> StreamResult:
    """Runs one stream to its end and classifies it. `first_event` is set on its first event."""
    stub = respond_pb2_grpc.RespondServiceStub(channel)
    call = stub.StreamRespond(request, timeout=plan.timeout)
    assembly = Assembly()
    loop = asyncio.get_running_loop()
    slow_until = loop.time() + plan.slow_seconds
    slow_end = time.time() + plan.slow_seconds
    result = await _observe(call, assembly, plan, slow_until, channel, first_event)
    result.slow_end = slow_end
    return result


async def _observe(
    call: grpc.aio.UnaryStreamCall[pb.StreamRespondRequest, pb.StreamRespondResponse],
    assembly: Assembly,
    plan: StreamPlan,
    slow_until: float,
    channel: grpc.aio.Channel,
    first_event: asyncio.Event | None,
) -> StreamResult:
    loop = asyncio.get_running_loop()
    client_cancelled = False
    try:
        while True:
            if plan.read_pause and loop.time() < slow_until:
                await asyncio.sleep(plan.read_pause)  # the consumer's pace, not a wait for state
            event = await call.read()
            if event is grpc.aio.EOF:
                break
            assembly.add(event)
            if first_event is not None:
                first_event.set()
            if (
                plan.cancel_after_chunks is not None
                and len(assembly.texts) >= plan.cancel_after_chunks
            ):
                client_cancelled = True
                if plan.close_channel:
                    await channel.close(grace=None)
                else:
                    call.cancel()
                break
    except grpc.aio.AioRpcError as error:
        trailers = list(error.trailing_metadata() or ())
        client_ended = error.code() in plan.client_codes
        return assembly.finish_error(error.code(), trailers, client_ended)
    except asyncio.CancelledError:
        if not client_cancelled:
            raise
    if client_cancelled:
        return assembly.result(CLEAN, "CANCELLED", "client")
    code = await call.code()
    if code != grpc.StatusCode.OK:
        trailers = list(await call.trailing_metadata() or ())
        return assembly.finish_error(code, trailers, code in plan.client_codes)
    return assembly.finish_ok()


def stream_request(labels: dict[str, str], max_tokens: int = 0) -> pb.StreamRespondRequest:
    """A STREAM request to the simulator; `max_tokens` defaults to the answer's length
    (the server's default, 512, would silently shorten longer simulated answers)."""
    max_tokens = max_tokens or int(labels.get("tokenwire.sim/answer-tokens", "0"))
    return pb.StreamRespondRequest(
        model="tokenwire-sim",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="fault matrix")],
        params=pb.GenerationParams(max_tokens=max_tokens),
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        labels=labels,
    )


# ----------------------------------------------------------------------------------------
# A fault's row


@dataclass
class Row:
    """One line of the table: what the streams saw and how the server came out of it."""

    fault: str
    streams: int
    results: list[StreamResult]
    rss_before: int
    rss_peak: int
    rss_after: int
    server_after: str
    server_ok: bool
    expect: str
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: nginx rows: how many upstream reads nginx itself logged as timed out.
    proxy_timeouts: int = 0

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def completed(self) -> int:
        return self.count(COMPLETED)

    @property
    def clean(self) -> int:
        return self.count(CLEAN)

    @property
    def unsequenced(self) -> int:
        return self.count(UNSEQUENCED)

    @property
    def losses(self) -> int:
        return self.count(LOSS)

    @property
    def reorders(self) -> int:
        return sum(1 for r in self.results if r.reordered)

    @property
    def unretracted(self) -> int:
        return sum(1 for r in self.results if r.diverged_unretracted)

    @property
    def tokens_per_chunk(self) -> float:
        tokens = [t for r in self.results for t in r.chunk_tokens]
        return sum(tokens) / len(tokens) if tokens else 0.0

    @property
    def heartbeats(self) -> int:
        return sum(r.heartbeats for r in self.results)

    @property
    def statuses(self) -> str:
        counts = Counter(f"{r.code}{'/' + r.reason if r.reason else ''}" for r in self.results)
        return ", ".join(f"{k} x{v}" for k, v in counts.most_common())

    @property
    def passed(self) -> bool:
        return not self.violations()

    def violations(self) -> list[str]:
        found = list(self.problems)
        if self.losses:
            found.append(f"{self.losses} silent losses")
        if self.reorders:
            found.append(f"{self.reorders} reorderings")
        if self.unretracted:
            found.append(f"{self.unretracted} divergences without retraction")
        if not self.server_ok:
            found.append(f"server after: {self.server_after}")
        return found


@dataclass(frozen=True)
class MatrixConfig:
    """Sizes and timings; the defaults are the documented run, tests shrink them."""

    streams: int = 100
    #: How long the slow consumer reads at one message per second.
    slow_seconds: float = 5.0
    #: nginx's idle timeout, and the silence the nginx rows generate (longer than it).
    proxy_timeout: float = 1.0
    silence: float = 2.0
    #: Stall detection; the stall row takes between 1 and 1.5 of these.
    stall_timeout: float = 1.0
    #: The deadline rows' deadline.
    deadline: float = 1.0
    #: The slow consumer's bound on text pending per stream (`--max-pending-chars`).
    slow_pending_chars: int = 8192
    #: Seconds of server CPU measured after each fault, to catch generations left running.
    idle_window: float = 1.0


async def drive(
    server_address: str,
    n: int,
    request_for: Callable[[int], pb.StreamRespondRequest],
    plan_for: Callable[[int], StreamPlan],
    own_channels: bool = False,
    started: Callable[[], Awaitable[None]] | None = None,
    channel_options: Sequence[tuple[str, int]] = (),
) -> list[StreamResult]:
    """Runs n concurrent streams; `started` runs once every stream has seen its first event."""
    firsts = [asyncio.Event() for _ in range(n)]
    options = list(channel_options)
    shared = None if own_channels else grpc.aio.insecure_channel(server_address, options)

    async def one(i: int) -> StreamResult:
        channel = shared or grpc.aio.insecure_channel(server_address, options)
        try:
            return await observe(channel, request_for(i), plan_for(i), firsts[i])
        finally:
            if shared is None:
                await channel.close()

    async def when_all_started() -> None:
        if started is not None:
            await asyncio.gather(*(f.wait() for f in firsts))
            await started()

    trigger = asyncio.create_task(when_all_started())
    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        if not trigger.done():
            trigger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trigger
        if shared is not None:
            await shared.close()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> bool:
    """Polls `condition` until true or `timeout` seconds pass."""
    until = time.monotonic() + timeout
    while True:
        if await condition():
            return True
        if time.monotonic() > until:
            return False
        await asyncio.sleep(interval)


async def follow_up(address: str) -> StreamResult:
    """A normal stream after the fault: the server still serves correctly."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await observe(
            channel,
            stream_request({"tokenwire.sim/answer-tokens": "64"}),
            StreamPlan(timeout=30),
        )


async def warm_up(address: str) -> None:
    """One call first, so the RSS baseline includes what the first call initialises."""
    result = await follow_up(address)
    if result.outcome != COMPLETED:
        raise RuntimeError(f"warm-up stream failed: {result}")


async def settle(server: Server, idle_window: float = 1.0) -> tuple[bool, str]:
    """After the streams: nothing active, nothing generating, and a follow-up works.

    A generation that outlived its call would keep the event loop busy (the
    simulator wakes every token), so server CPU over an idle window is the
    leak detector for the backend side; `tokenwire_active_streams` is the
    delivery side. The window also lets `--retention 1` expire the ended
    responses, which the follow-up call's registration then evicts.
    """

    async def no_active() -> bool:
        return await server.metric("tokenwire_active_streams") == 0

    drained = await wait_for(no_active, timeout=15)
    active = await server.metric("tokenwire_active_streams")
    cpu_before = server.cpu_seconds()
    started = time.monotonic()
    await asyncio.sleep(idle_window)  # a measurement window, not synchronisation
    idle_cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - started)
    after = await follow_up(server.address)
    ok = drained and idle_cpu < 0.10 and after.outcome == COMPLETED
    summary = (
        f"active {active:.0f}, idle CPU {idle_cpu:.0%}, follow-up "
        f"{'ok' if after.outcome == COMPLETED else after.outcome + ' ' + after.code}"
    )
    return ok, summary


async def measure_row(
    name: str,
    expect: str,
    config: MatrixConfig,
    server: Server,
    address: str,
    request_for: Callable[[int], pb.StreamRespondRequest],
    plan_for: Callable[[int], StreamPlan],
    own_channels: bool = False,
) -> Row:
    """Warm up, drive every stream through `address`, let the server settle, and
    report: RSS before / peak / after and the settled state are the server's."""
    await warm_up(address)
    before = server.rss_bytes()
    with RssSampler(server) as sampler:
        results = await drive(address, config.streams, request_for, plan_for, own_channels)
    ok, summary = await settle(server, config.idle_window)
    return Row(
        name,
        config.streams,
        results,
        before,
        sampler.peak,
        server.rss_bytes(),
        summary,
        ok,
        expect,
    )


async def run_on_fresh_server(
    name: str,
    expect: str,
    config: MatrixConfig,
    flags: Sequence[str],
    request_for: Callable[[int], pb.StreamRespondRequest],
    plan_for: Callable[[int], StreamPlan],
    own_channels: bool = False,
) -> Row:
    server = await start_server(*flags)
    try:
        return await measure_row(
            name, expect, config, server, server.address, request_for, plan_for, own_channels
        )
    finally:
        await server.stop()


# ----------------------------------------------------------------------------------------
# The faults


async def fault_backend_failure(config: MatrixConfig) -> Row:
    """The backend fails after N tokens (N = 0..29 across the streams)."""

    def request(i: int) -> pb.StreamRespondRequest:
        return stream_request(
            {
                "tokenwire.sim/answer-tokens": "64",
                "tokenwire.sim/inter-token-ms": "2",
                "tokenwire.sim/fail-after": str(i % 30),
            }
        )

    row = await run_on_fresh_server(
        "backend failure after N tokens",
        "all clean UNAVAILABLE/BACKEND_FAILED",
        config,
        (),
        request,
        lambda i: StreamPlan(timeout=30),
    )
    _expect_all(row, CLEAN, "UNAVAILABLE")
    return row


async def fault_backend_stall(config: MatrixConfig) -> Row:
    """The backend goes silent after N tokens; heartbeats flow until the stall timeout."""
    heartbeat = config.stall_timeout / 4

    def request(i: int) -> pb.StreamRespondRequest:
        return stream_request(
            {
                "tokenwire.sim/answer-tokens": "64",
                "tokenwire.sim/inter-token-ms": "2",
                "tokenwire.sim/stall-after": str(1 + i % 10),
            }
        )

    row = await run_on_fresh_server(
        "backend stall",
        "all clean UNAVAILABLE/BACKEND_STALLED, heartbeats during the stall",
        config,
        (
            "--stall-timeout",
            str(config.stall_timeout),
            "--heartbeat-interval",
            str(heartbeat),
        ),
        request,
        lambda i: StreamPlan(timeout=30),
    )
    _expect_all(row, CLEAN, "UNAVAILABLE")
    if row.heartbeats < row.streams:
        row.problems.append(f"only {row.heartbeats} heartbeats over {row.streams} stalled streams")
    row.notes.append(f"stall timeout {config.stall_timeout:g} s, heartbeat every {heartbeat:g} s")
    return row


def _long_generation() -> dict[str, str]:
    """About 10 s of tokens: a call that goes away leaves most of it ungenerated."""
    return {"tokenwire.sim/answer-tokens": "2000", "tokenwire.sim/inter-token-ms": "5"}


async def fault_client_disconnect(config: MatrixConfig) -> Row:
    """Clients go away mid-stream: half cancel the call, half drop their connection."""
    row = await run_on_fresh_server(
        "client disconnect",
        "client sees CANCELLED; server frees the stream and stops generation",
        config,
        (),
        lambda i: stream_request(_long_generation()),
        lambda i: StreamPlan(timeout=60, cancel_after_chunks=3 + i % 5, close_channel=i % 2 == 1),
        own_channels=True,
    )
    _expect_all(row, CLEAN, "CANCELLED")
    row.notes.append("even streams cancel the call (RST_STREAM), odd ones close their channel")
    return row


async def fault_deadline_client(config: MatrixConfig) -> Row:
    """The caller's deadline passes mid-stream."""
    row = await run_on_fresh_server(
        "deadline expiry (caller's deadline)",
        "client sees DEADLINE_EXCEEDED; server stops generation",
        config,
        (),
        lambda i: stream_request(_long_generation()),
        lambda i: StreamPlan(
            timeout=config.deadline, client_codes=frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})
        ),
    )
    _expect_all(row, CLEAN, "DEADLINE_EXCEEDED")
    return row


async def fault_deadline_server(config: MatrixConfig) -> Row:
    """The server's cap on a call's run time (`--max-deadline`) passes mid-stream."""
    row = await run_on_fresh_server(
        "deadline expiry (server's cap)",
        "all clean DEADLINE_EXCEEDED with the last sequence",
        config,
        ("--default-deadline", str(config.deadline), "--max-deadline", str(config.deadline)),
        lambda i: stream_request(_long_generation()),
        lambda i: StreamPlan(timeout=30),
    )
    _expect_all(row, CLEAN, "DEADLINE_EXCEEDED")
    return row


#: A slow reader's channel without BDP probing, so HTTP/2 flow control pushes back at
#: once: with probing (grpc's default) the reader's transport grows its receive window
#: and buffers megabytes in the *reader's* process before the server sees backpressure.
SLOW_READER_CHANNEL = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384))
#: Chunks that may be sent but unread per stream: the reader's 16 KiB window plus
#: slack for the chunk that straddles it and HTTP/2 framing.
IN_FLIGHT_SLACK = 16384 + 4096


async def fault_slow_consumer(config: MatrixConfig) -> Row:
    """A fast backend, clients reading one message a second, then draining the rest.

    What a slow reader may cost the server is bounded twice: chunks are written
    only as HTTP/2 flow control lets them go (the reader's window, 16 KiB here),
    and released text waiting to be cut is bounded by `--max-pending-chars`,
    beyond which generation waits. The chunk emission times show the first
    (how far the server got ahead of each reader), the RSS shows the total, and
    each message the slow reader takes carries many coalesced tokens.
    """
    pending = config.slow_pending_chars
    answer = 10000
    per_chunk_cap = 256
    server = await start_server("--max-pending-chars", str(pending))
    slow_probe: dict[str, float] = {}

    async def probe_slow_phase() -> None:
        """The server's RSS just before the readers speed up."""
        await asyncio.sleep(max(config.slow_seconds - 0.2, 0.1))  # when to measure
        slow_probe["rss"] = server.rss_bytes()

    def request(i: int) -> pb.StreamRespondRequest:
        message = stream_request(
            {"tokenwire.sim/answer-tokens": str(answer), "tokenwire.sim/inter-token-ms": "0"}
        )
        message.chunking.max_tokens_per_chunk = per_chunk_cap
        return message

    try:
        await warm_up(server.address)
        before = server.rss_bytes()
        with RssSampler(server) as sampler:
            probe = asyncio.create_task(probe_slow_phase())
            results = await drive(
                server.address,
                config.streams,
                request,
                lambda i: StreamPlan(timeout=120, read_pause=1.0, slow_seconds=config.slow_seconds),
                channel_options=SLOW_READER_CHANNEL,
            )
            await probe
        ok, summary = await settle(server, config.idle_window)
        row = Row(
            "slow consumer (1 msg/s)",
            config.streams,
            results,
            before,
            sampler.peak,
            server.rss_bytes(),
            summary,
            ok,
            "all completed; generation waits for the reader; tokens coalesce (> 1 per chunk)",
        )
    finally:
        await server.stop()
    _expect_all(row, COMPLETED, "OK")
    slow_reads = max(int(config.slow_seconds) - 1, 1)
    slow_phase = [t for r in row.results for t in r.chunk_tokens[1 : 1 + slow_reads]]
    per_chunk = sum(slow_phase) / len(slow_phase) if slow_phase else 0.0
    if per_chunk <= 1:
        row.problems.append("tokens did not coalesce while the reader was slow")
    # Chunk emission times tell how far the server ran ahead of each reader: by the end
    # of the slow phase it may have sent what the reader's window holds, never the
    # whole answer.
    ahead = [_ahead_at_slow_end(r) for r in row.results if r.timeline]
    finished_early = sum(1 for r in row.results if r.timeline and r.timeline[-1][0] <= r.slow_end)
    bound = IN_FLIGHT_SLACK
    if finished_early:
        row.problems.append(
            f"{finished_early} answers were fully sent before their reader's slow phase ended: "
            "generation did not wait for the reader"
        )
    if ahead and max(ahead) > bound:
        row.problems.append(f"server ran {max(ahead)} bytes ahead of a reader (bound {bound})")
    row.notes.append(
        f"{answer:,}-token answers, --max-pending-chars {pending}, chunks of up to "
        f"{per_chunk_cap} tokens; reads 1 msg/s for {config.slow_seconds:g} s, then drains"
    )
    row.notes.append(
        f"at the end of the slow phase the server was at most {max(ahead, default=0) / 1024:.1f}"
        f" KiB of chunks ahead of a reader (its window: 16 KiB); answers finished before"
        f" their reader sped up: {finished_early}"
    )
    row.notes.append(
        f"while slow: {per_chunk:.1f} tokens/chunk; server RSS "
        f"{slow_probe.get('rss', 0) / MIB:.1f} MiB at the end of the slow phase"
    )
    return row


async def fault_sigterm(config: MatrixConfig, outlive_grace: bool = False) -> Row:
    """SIGTERM while every stream is mid-flight: drain (or cut at the grace period)."""
    grace = 0.5 if outlive_grace else 10.0
    labels = {"tokenwire.sim/answer-tokens": "200", "tokenwire.sim/inter-token-ms": "10"}
    if outlive_grace:
        labels = _long_generation()
    server = await start_server("--grace-period", str(grace))
    try:
        await warm_up(server.address)
        before = server.rss_bytes()
        signalled_at: list[float] = []

        async def terminate() -> None:
            signalled_at.append(time.monotonic())
            server.process.process.send_signal(signal.SIGTERM)

        with RssSampler(server) as sampler:
            results = await drive(
                server.address,
                config.streams,
                lambda i: stream_request(labels),
                lambda i: StreamPlan(timeout=60),
                started=terminate,
            )
            after = server.rss_bytes()
        code = await asyncio.wait_for(server.process.process.wait(), 60)
    finally:
        await server.stop()
    exited = time.monotonic() - signalled_at[0] if signalled_at else 0.0
    row = Row(
        "SIGTERM, streams outlive grace" if outlive_grace else "SIGTERM during streams (drain)",
        config.streams,
        results,
        before,
        sampler.peak,
        after,
        f"exit {code} {exited:.1f} s after SIGTERM",
        code == 0,
        (
            "streams cut at the grace period end with a clean status"
            if outlive_grace
            else "all completed within the grace period, exit 0"
        ),
    )
    if not signalled_at:
        row.problems.append("SIGTERM was never sent")
    if outlive_grace:
        _expect_all(row, CLEAN, None)
        row.notes.append(f"grace period {grace:g} s, 10 s generations")
    else:
        _expect_all(row, COMPLETED, "OK")
        row.notes.append(f"grace period {grace:g} s, 2 s generations")
    return row


NGINX_ROWS = {
    "heartbeats": ("nginx, heartbeats on", "all completed through the proxy"),
    "control": (
        "nginx, heartbeats off (control)",
        "nginx cuts every stream; the client sees an error, never a silent end",
    ),
    "failure": (
        "nginx, backend failure after N tokens",
        "all clean UNAVAILABLE/BACKEND_FAILED: the trailers cross the proxy",
    ),
}


async def fault_nginx(config: MatrixConfig, variant: str = "heartbeats") -> Row:
    """Streams through nginx whose idle timeout is shorter than a silence in generation.

    `heartbeats`: heartbeats come more often than the timeout, streams survive.
    `control`: the heartbeat interval is longer than the timeout, nginx cuts.
    `failure`: the backend fails mid-stream behind the proxy; the status details
    and `tokenwire-last-sequence` must reach the client through nginx.
    """
    name, expect = NGINX_ROWS[variant]
    interval = config.silence * 10 if variant == "control" else config.proxy_timeout / 4

    def request(i: int) -> pb.StreamRespondRequest:
        if variant == "failure":
            return stream_request(
                {
                    "tokenwire.sim/answer-tokens": "64",
                    "tokenwire.sim/inter-token-ms": "2",
                    "tokenwire.sim/fail-after": str(i % 30),
                }
            )
        return stream_request(
            {
                "tokenwire.sim/answer-tokens": "3",
                "tokenwire.sim/ttft-ms": "0",
                "tokenwire.sim/inter-token-ms": str(int(config.silence * 1000)),
            }
        )

    server = await start_server(
        "--heartbeat-interval", str(interval), "--stall-timeout", str(config.silence * 5)
    )
    # The failure row is about trailers crossing the proxy, not idle timeouts: a longer
    # timeout keeps an overloaded machine (100 new upstream connections at once) from
    # turning a slow call start into nginx's own UNAVAILABLE before any response header.
    read_timeout = 5.0 if variant == "failure" else config.proxy_timeout
    proxy = NginxProxy(server.address, read_timeout=read_timeout)
    try:
        await proxy.start()
        row = await measure_row(
            name, expect, config, server, proxy.address, request, lambda i: StreamPlan(timeout=30)
        )
        timeouts = proxy.error_log.count("upstream timed out")
    finally:
        await proxy.stop()
        await server.stop()
    row.proxy_timeouts = timeouts
    row.notes.append(
        f"grpc_read_timeout {read_timeout:g} s, heartbeat every {interval:g} s"
        + ("" if variant == "failure" else f", {config.silence:g} s between tokens")
        + f"; nginx logged {timeouts} upstream timeouts"
    )
    if variant == "control":
        cut = row.clean + row.unsequenced
        if cut != row.streams:
            row.problems.append(f"only {cut} of {row.streams} streams ended by the proxy")
        return row
    if variant == "failure":
        _expect_all(row, CLEAN, "UNAVAILABLE")
    else:
        _expect_all(row, COMPLETED, "OK")
    if timeouts:
        row.problems.append(f"nginx timed out {timeouts} upstream reads")
    return row


def _ahead_at_slow_end(result: StreamResult) -> int:
    """Bytes the server had emitted but this reader had not yet read when it sped up."""
    emitted = sum(size for sent, _, size in result.timeline if sent <= result.slow_end)
    read = sum(size for _, got, size in result.timeline if got <= result.slow_end)
    return emitted - read


def _expect_all(row: Row, outcome: str, code: str | None) -> None:
    """Every stream must end `outcome` (and with status `code`, when given)."""
    wrong = [r for r in row.results if r.outcome != outcome or (code and r.code != code)]
    if wrong:
        sample = wrong[0]
        row.problems.append(
            f"{len(wrong)} streams not {outcome} {code or ''}".rstrip()
            + f" (e.g. {sample.outcome} {sample.code}/{sample.reason} {sample.detail})".rstrip()
        )


FaultRunner = Callable[[MatrixConfig], Awaitable[Row]]

FAULTS: dict[str, FaultRunner] = {
    "failure": fault_backend_failure,
    "stall": fault_backend_stall,
    "disconnect": fault_client_disconnect,
    "deadline": fault_deadline_client,
    "server-deadline": fault_deadline_server,
    "slow-consumer": fault_slow_consumer,
    "sigterm": fault_sigterm,
    "sigterm-grace": lambda config: fault_sigterm(config, outlive_grace=True),
    "nginx": fault_nginx,
    "nginx-control": lambda config: fault_nginx(config, "control"),
    "nginx-failure": lambda config: fault_nginx(config, "failure"),
}

NGINX_FAULTS = frozenset({"nginx", "nginx-control", "nginx-failure"})


async def run_matrix(
    config: MatrixConfig, only: Sequence[str] = (), progress: bool = False
) -> list[Row]:
    """Runs the selected faults one after another (each on its own server)."""
    rows = []
    for name, runner in FAULTS.items():
        if only and name not in only:
            continue
        if name in NGINX_FAULTS and find_nginx() is None:
            print(f"skipping {name}: nginx is not installed", file=sys.stderr)
            continue
        started = time.monotonic()
        row = await runner(config)
        took = time.monotonic() - started
        row.notes.append(f"took {took:.1f} s")
        rows.append(row)
        if progress:
            verdict = "PASS" if row.passed else "FAIL"
            print(f"  {name}: {verdict} in {took:.1f} s", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------
# Output

COLUMNS = (
    "fault",
    "streams",
    "completed",
    "clean status",
    "error w/o seq",
    "silent loss",
    "reorder",
    "div. w/o retraction",
    "tok/chunk",
    "heartbeats",
    "RSS MiB before / peak / after",
    "server after",
    "result",
)


def cells(row: Row) -> list[str]:
    return [
        row.fault,
        str(row.streams),
        str(row.completed),
        str(row.clean),
        str(row.unsequenced),
        str(row.losses),
        str(row.reorders),
        str(row.unretracted),
        f"{row.tokens_per_chunk:.1f}",
        str(row.heartbeats),
        f"{row.rss_before / MIB:.1f} / {row.rss_peak / MIB:.1f} / {row.rss_after / MIB:.1f}",
        row.server_after,
        "PASS" if row.passed else "FAIL",
    ]


def render(rows: Sequence[Row], markdown: bool) -> str:
    table = [list(COLUMNS), *(cells(r) for r in rows)]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(table[0]) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in table[1:])
    else:
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        for index, r in enumerate(table):
            lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
            if index == 0:
                lines.append("-+-".join("-" * w for w in widths))
    lines.append("")
    for row in rows:
        lines.append(f"{row.fault}: expect {row.expect}")
        lines.append(f"    statuses: {row.statuses}")
        for note in row.notes:
            lines.append(f"    {note}")
        for violation in row.violations():
            lines.append(f"    FAIL: {violation}")
    return "\n".join(lines)


def header(config: MatrixConfig) -> str:
    load = os.getloadavg()
    return (
        f"tokenwire fault matrix, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{config.streams} concurrent streams per fault, {os.cpu_count()} cores "
        f"({platform.machine()}, Python {platform.python_version()}), "
        f"load average {load[0]:.2f} at start"
    )


async def main(args: argparse.Namespace) -> int:
    config = MatrixConfig(
        streams=args.streams,
        slow_seconds=args.slow_seconds,
        slow_pending_chars=args.slow_pending_chars,
    )
    unknown = set(args.only) - set(FAULTS)
    if unknown:
        print(f"unknown fault(s): {', '.join(sorted(unknown))}; know {', '.join(FAULTS)}")
        return 2
    print(header(config), flush=True)
    started = time.monotonic()
    rows = await run_matrix(config, args.only, progress=True)
    print()
    print(render(rows, args.markdown))
    print(f"\nwhole matrix: {time.monotonic() - started:.0f} s")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams per fault")
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="FAULT", help=f"any of: {', '.join(FAULTS)}"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=5.0, help="how long the slow consumer reads slowly"
    )
    parser.add_argument(
        "--slow-pending-chars",
        type=int,
        default=8192,
        help="the slow consumer's server --max-pending-chars (huge: see it unbounded)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    sys.exit(asyncio.run(main(parser.parse_args())))
