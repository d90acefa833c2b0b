"""Shared fixtures: a real grpc.aio tokenwire server on 127.0.0.1:0 and channels to it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire_server.backends.simulator import SimulatorBackend
from tokenwire_server.config import Config, UpstreamConfig, load_config
from tokenwire_server.governance.policy import Policy
from tokenwire_server.server import TokenwireServer

# `.venv/bin/pytest` without an activated virtualenv: what it holds (buf, the
# `tokenwire` script, the `python` of scripts/generate_stubs.sh) comes first on
# PATH for every subprocess, as if it were activated.
if sys.prefix != sys.base_prefix:
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])

#: Fast but not instant generation, so streams really interleave with writes.
FAST_SIMULATOR = {"sim_time_to_first_token": "0", "sim_inter_token_delay": "0.0005"}


def make_config(**overrides: object) -> Config:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "audit_path": ":memory:",
        **FAST_SIMULATOR,
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return load_config(values, env={})


@dataclass
class RunningServer:
    server: TokenwireServer
    address: str
    channel: grpc.aio.Channel
    stub: respond_pb2_grpc.RespondServiceStub

    @property
    def simulator(self) -> SimulatorBackend:
        return next(b for b in self.server.backends if isinstance(b, SimulatorBackend))

    @property
    def config(self) -> Config:
        return self.server.config


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Starts servers with config overrides (and optionally a policy); stops them after."""
    running: list[RunningServer] = []

    async def start(
        policy: Policy | str | None = None,
        upstreams: tuple[UpstreamConfig, ...] = (),
        tracer_provider: TracerProvider | None = None,
        **overrides: object,
    ) -> RunningServer:
        """`policy` is a Policy object, or a policy source (file path, builtin:NAME)."""
        if isinstance(policy, str):
            overrides["policy"] = policy
            policy = None
        config = dataclasses.replace(make_config(**overrides), upstreams=upstreams)
        server = TokenwireServer(config, policy=policy, tracer_provider=tracer_provider)
        port = await server.start()
        address = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(address)
        handle = RunningServer(
            server, address, channel, respond_pb2_grpc.RespondServiceStub(channel)
        )
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.channel.close()
        await handle.server.drain(grace=0)


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_USER, content=text)


def stream_request(text: str = "Tell me about streams", **fields: Any) -> pb.StreamRespondRequest:
    fields.setdefault("messages", [user(text)])
    fields.setdefault("delivery_mode", pb.DELIVERY_MODE_STREAM)
    return pb.StreamRespondRequest(**fields)


def respond_request(text: str = "Tell me about streams", **fields: Any) -> pb.RespondRequest:
    fields.setdefault("messages", [user(text)])
    return pb.RespondRequest(**fields)


async def collect(
    call: grpc.aio.UnaryStreamCall[pb.StreamRespondRequest, pb.StreamRespondResponse],
) -> list[pb.StreamRespondResponse]:
    return [event async for event in call]


def chunks_of(events: list[pb.StreamRespondResponse]) -> list[pb.TokenChunk]:
    return [e.chunk for e in events if e.WhichOneof("event") == "chunk"]


def completed_of(events: list[pb.StreamRespondResponse]) -> pb.Completed:
    assert events[-1].WhichOneof("event") == "completed", events[-1]
    completions = [e for e in events if e.WhichOneof("event") == "completed"]
    assert len(completions) == 1
    return events[-1].completed


def replace_config(config: Config, section: str, **values: object) -> Config:
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **values)}
    )


@dataclass
class StatusDetails:
    code: grpc.StatusCode
    message: str
    error_info: Any
    bad_request: Any
    retry_info: Any
    trailers: dict[str, str]


def status_details(error: grpc.aio.AioRpcError) -> StatusDetails:
    """Decodes google.rpc details straight from the trailers, independent of the client."""
    from google.rpc import error_details_pb2, status_pb2

    trailers: dict[str, str] = {}
    info = bad = retry = None
    infos = 0
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0]
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    infos += 1
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
        elif isinstance(value, str):
            trailers[key] = value
    assert infos == 1, "exactly one ErrorInfo"
    return StatusDetails(error.code(), error.details() or "", info, bad, retry, trailers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A scripted OpenAI-compatible upstream: a real aiohttp server on loopback."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Upstream:
        state = Upstream(url="")

        async def recorded(request: web.Request) -> web.StreamResponse:
            state.requests.append(await request.json())
            try:
                return await handler(request)
            except BaseException:
                # aiohttp cancels the handler (or its write fails) when the client hangs up.
                state.disconnected.set()
                raise

        app = web.Application()
        app.router.add_post("/v1/chat/completions", recorded)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state.url = f"http://127.0.0.1:{port}/v1"
        return state

    yield start
    for runner in runners:
        await runner.cleanup()


def serve_env(drop: tuple[str, ...] = ("TOKENWIRE_",)) -> dict[str, str]:
    """This process's environment without the variables whose names start with `drop`."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


async def spawn_serve(
    *flags: str, stderr: int = asyncio.subprocess.PIPE, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`tokenwire serve` on a free port with no audit file and no TOKENWIRE_*
    settings from the environment; `flags` add to or override those."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "serve",
        "--port",
        "0",
        "--audit-path",
        ":memory:",
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=serve_env() if env is None else env,
    )


async def run_serve(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs `tokenwire serve` until it exits (a refused start); its status and stderr."""
    process = await spawn_serve(*flags, env=env)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def start_serve_process(
    *flags: str, stderr: int = asyncio.subprocess.PIPE, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """A real `tokenwire serve` process (see `spawn_serve`), returned once it
    listens, with its address."""
    process = await spawn_serve(*flags, stderr=stderr, env=env)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
    match = re.search(r"serving on \S+:(\d+)", line)
    assert match, line
    return process, f"127.0.0.1:{match.group(1)}"


#: Set by `.ci/run`: a missing polyglot toolchain or tool fails instead of skipping.
REQUIRE_POLYGLOT = os.environ.get("TOKENWIRE_REQUIRE_POLYGLOT") == "1"


def find_tool(name: str) -> str | None:
    """An executable on PATH or in Go's install directory (where scripts/setup.sh
    puts grpcurl and the protoc plugins), or None."""
    found = shutil.which(name)
    if found:
        return found
    go = shutil.which("go")
    if go is None:
        return None
    gobin = subprocess.run([go, "env", "GOBIN"], capture_output=True, text=True).stdout.strip()
    if not gobin:
        gopath = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True).stdout
        gobin = str(Path(gopath.strip().split(os.pathsep)[0]) / "bin")
    candidate = Path(gobin) / name
    return str(candidate) if candidate.is_file() else None


def require_tool(name: str) -> str:
    """The tool's path; skips the test without it (fails under TOKENWIRE_REQUIRE_POLYGLOT=1)
    so a machine without the toolchain still runs the rest of the suite."""
    path = find_tool(name)
    if path is None:
        message = f"{name} not found; run scripts/setup.sh"
        if REQUIRE_POLYGLOT:
            pytest.fail(message)
        pytest.skip(message)
    return path


#: Debian's redis-server, for the tests of several replicas and of store outages.
REDIS_SERVER = shutil.which("redis-server")
if REDIS_SERVER is None and os.environ.get("TOKENWIRE_REQUIRE_REDIS") == "1":
    raise RuntimeError("TOKENWIRE_REQUIRE_REDIS=1 but redis-server is not installed")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="needs Debian's redis-server (apt-get install redis-server; .ci/run does)",
)


class RedisServer:
    """A real `redis-server` on a fixed loopback port; it can be killed and started
    again on the same port (an outage and a recovery). Without `persistent` a
    restart comes back empty; with it, every write is in the append-only file."""

    def __init__(self, directory: Path, persistent: bool = False) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._persistence = ("yes", "always") if persistent else ("no", "no")
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        import redis.asyncio as redis

        assert REDIS_SERVER is not None and self._process is None
        self._process = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--dir", str(self._directory)),
            *("--appendonly", self._persistence[0], "--appendfsync", self._persistence[1]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = redis.from_url(self.url)
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # bounded wait for the server to accept connections
                try:
                    if await client.ping():
                        return
                except redis.ConnectionError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def pause(self) -> None:
        """SIGSTOP: a hung server; connections stay open and nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def unpause(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is saved."""
        if self._process is not None:
            self._process.kill()
            await self._process.wait()
            self._process = None


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("needs Debian's redis-server (apt-get install redis-server; .ci/run does)")
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
