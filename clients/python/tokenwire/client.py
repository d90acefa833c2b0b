"""tokenwire clients: `AsyncClient` for asyncio callers, `Client` for threads.

Both set a deadline on every call by default (a call without one can hang
forever behind a stuck proxy), check every chunk (`tokenwire.stream`), and
raise the typed errors of `tokenwire.errors`.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

import grpc
from google.protobuf import duration_pb2

from tokenwire import tools as tool_specs
from tokenwire.errors import ProtocolError, TokenwireError, from_rpc_error
from tokenwire.observed import ObservationHook, Observed, Observer
from tokenwire.stream import (
    Event,
    Result,
    StreamAssembler,
    ToolCall,
    unary_result,
    worth_resuming,
)
from tokenwire.tools import ResponseFormatSpec, ToolChoiceSpec, ToolSpec
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 60.0
#: A stream silent this long (the server sends a heartbeat after 10 s of silence)
#: counts as a stall in `observed.stalls`; the server fails a stalled generation at 30 s.
DEFAULT_STALL_TIMEOUT = 30.0
REQUEST_ID_HEADER = "x-request-id"

Mode = Literal["auto", "stream", "buffered"]
_MODES: dict[str, pb.DeliveryMode] = {
    "auto": pb.DELIVERY_MODE_AUTO,
    "stream": pb.DELIVERY_MODE_STREAM,
    "buffered": pb.DELIVERY_MODE_BUFFERED,
}
Prompt = str | Sequence[pb.ChatMessage]


class RespondOptions(TypedDict, total=False):
    """Keyword options of `respond` (see `build_respond_request`)."""

    model: str
    system: str | None
    max_tokens: int
    temperature: float | None
    top_p: float | None
    stop: Sequence[str]
    seed: int | None
    labels: Mapping[str, str] | None
    request_id: str
    tools: Sequence[ToolSpec]
    tool_choice: ToolChoiceSpec | None
    response_format: ResponseFormatSpec | None


class StreamOptions(RespondOptions, total=False):
    """Keyword options of `stream` (see `build_stream_request`)."""

    mode: Mode
    max_tokens_per_chunk: int
    max_delay: float | None
    omit_final_text: bool
    resumable: bool


def _messages(prompt: Prompt, system: str | None) -> list[pb.ChatMessage]:
    messages: list[pb.ChatMessage] = []
    if system:
        messages.append(pb.ChatMessage(role=pb.ROLE_SYSTEM, content=system))
    if isinstance(prompt, str):
        messages.append(pb.ChatMessage(role=pb.ROLE_USER, content=prompt))
    else:
        messages.extend(prompt)
    return messages


def _params(
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    stop: Sequence[str],
    seed: int | None,
) -> pb.GenerationParams:
    params = pb.GenerationParams(max_tokens=max_tokens, stop=list(stop))
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    return params


def build_stream_request(
    prompt: Prompt,
    *,
    model: str = "",
    system: str | None = None,
    mode: Mode = "auto",
    max_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    labels: Mapping[str, str] | None = None,
    request_id: str = "",
    max_tokens_per_chunk: int = 0,
    max_delay: float | None = None,
    omit_final_text: bool = False,
    resumable: bool = False,
    tools: Sequence[ToolSpec] = (),
    tool_choice: ToolChoiceSpec | None = None,
    response_format: ResponseFormatSpec | None = None,
) -> pb.StreamRespondRequest:
    """A `StreamRespond` request. `tools`, `tool_choice` and `response_format`
    take plain dicts (OpenAI's shapes included) or messages: see `tokenwire.tools`."""
    request = pb.StreamRespondRequest(
        request_id=request_id,
        model=model,
        messages=_messages(prompt, system),
        params=_params(max_tokens, temperature, top_p, stop, seed),
        labels=dict(labels or {}),
        delivery_mode=_MODES[mode],
        chunking=pb.Chunking(max_tokens_per_chunk=max_tokens_per_chunk),
        omit_final_text=omit_final_text,
        resumable=resumable,
    )
    if max_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max_delay * 1e9))
        request.chunking.max_delay.CopyFrom(delay)
    _add_tools(request, tools, tool_choice, response_format)
    return request


def _add_tools(
    request: pb.StreamRespondRequest | pb.RespondRequest,
    tools: Sequence[ToolSpec],
    tool_choice: ToolChoiceSpec | None,
    response_format: ResponseFormatSpec | None,
) -> None:
    request.tools.extend(tool_specs.tools(tools))
    if tool_choice is not None:
        request.tool_choice.CopyFrom(tool_specs.tool_choice(tool_choice))
    if response_format is not None:
        request.response_format.CopyFrom(tool_specs.response_format(response_format))


def build_respond_request(
    prompt: Prompt,
    *,
    model: str = "",
    system: str | None = None,
    max_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    labels: Mapping[str, str] | None = None,
    request_id: str = "",
    tools: Sequence[ToolSpec] = (),
    tool_choice: ToolChoiceSpec | None = None,
    response_format: ResponseFormatSpec | None = None,
) -> pb.RespondRequest:
    request = pb.RespondRequest(
        request_id=request_id,
        model=model,
        messages=_messages(prompt, system),
        params=_params(max_tokens, temperature, top_p, stop, seed),
        labels=dict(labels or {}),
    )
    _add_tools(request, tools, tool_choice, response_format)
    return request


def _request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value
    return ""


@dataclass(frozen=True)
class ResumePolicy:
    """How a stream survives a dropped connection: bounded, jittered, within the deadline."""

    attempts: int = 3
    backoff: float = 0.1

    def delay(self, attempt: int) -> float:
        return float(self.backoff * (2**attempt) * (0.5 + random.random()))


def tls_credentials(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca` to trust the server (system roots
    when omitted), `cert` and `key` to present a client certificate (mTLS)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both cert and key")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


#: gRPC target URIs that name their addresses themselves (`ipv4:10.0.0.1:50051,10.0.0.2:50051`,
#: `dns:///gateway:50051`): kept whole, gRPC picks among them.
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def split_targets(target: str | Sequence[str]) -> list[str]:
    """The addresses a client fails over between, in order: a list, or one string
    of comma-separated `HOST:PORT`s ("gw-a:50051,gw-b:50051")."""
    if isinstance(target, str):
        parts = [target] if target.startswith(_GRPC_SCHEMES) else target.split(",")
    else:
        parts = list(target)
    addresses = [part.strip() for part in parts if part.strip()]
    if not addresses:
        raise ValueError(f"no address in target {target!r}")
    return addresses


def never_connected(error: TokenwireError) -> bool:
    """gRPC could not connect at all (refused, unreachable, a failed TLS handshake):
    the call reached no server, so sending it to another address is safe."""
    return (
        error.code == grpc.StatusCode.UNAVAILABLE
        and not error.domain
        and "failed to connect to all addresses" in error.message
    )


class _Targets:
    """The addresses a client calls, in order, and the one it calls now.

    A call that could not connect is sent to the next address at once (it
    reached no server); a resumable stream whose connection dropped resumes on
    the next one (replicas sharing a store continue it). The move sticks for
    the client's later calls, so a dead replica costs one failed connection.
    """

    def __init__(self, addresses: list[str], channels: list[Any]) -> None:
        self.addresses = addresses
        self.channels = channels
        self._stubs = [respond_pb2_grpc.RespondServiceStub(channel) for channel in channels]
        self._index = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._stubs)

    def current(self) -> tuple[int, respond_pb2_grpc.RespondServiceStub]:
        index = self._index
        return index, self._stubs[index]

    def fail_over(self, failed: int) -> None:
        """Moves past address number `failed`, unless another call already has."""
        with self._lock:
            if self._index == failed:
                self._index = (failed + 1) % len(self._stubs)


class _StallWatch:
    """A blocking client's stall watch: one daemon thread, started with the first
    stream, that looks at every stream being read a quarter of `timeout` apart."""

    def __init__(self, timeout: float) -> None:
        self._interval = timeout / 4
        self._streams: set[_StreamState] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, stream: _StreamState) -> None:
        with self._lock:
            self._streams.add(stream)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="tokenwire-stall-watch", daemon=True
                )
                self._thread.start()

    def discard(self, stream: _StreamState) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        while not self._closed.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams)
            for stream in streams:
                stream._check_stall(now)

    def close(self) -> None:
        self._closed.set()


@dataclass
class _Shared:
    """What a client's streams share with it."""

    targets: _Targets
    metadata: tuple[tuple[str, str], ...]
    resume: ResumePolicy | None
    observer: Observer
    stall_timeout: float | None
    watch: _StallWatch | None = None


def _check_stall_timeout(stall_timeout: float | None) -> None:
    if stall_timeout is not None and not stall_timeout > 0:
        raise ValueError(f"stall_timeout must be positive or None, got {stall_timeout!r}")


class _StreamState:
    """What the sync and async streams share: the checks, the resume and fail-over
    decisions, the stall check, cancel."""

    def __init__(
        self,
        shared: _Shared,
        request: pb.StreamRespondRequest,
        timeout: float,
        assembler: StreamAssembler | None = None,
    ) -> None:
        self._shared = shared
        self._request = request
        self._deadline = time.monotonic() + timeout
        # A resume by hand continues a response its first caller made resumable.
        resumable = request.resumable or request.HasField("resume")
        self._resume = shared.resume if resumable else None
        self._assembler = assembler or StreamAssembler()
        if self._assembler.observe is None:
            self._assembler.observe = self._observe
        self._call: Any = None
        self._cancelled = False
        self._connect_failures = 0
        self._call_started = 0.0
        self._awaiting_first = True
        self._resuming = False
        self._last_event_at = time.monotonic()
        self._stalled = False
        #: Resumes after a dropped connection so far.
        self.resumes = 0
        #: Seconds from the start of the latest resumed call (automatic, or a
        #: `resume` request by hand) to the first chunk or `Completed` it brought:
        #: the time to first token a caller saw after a resume or a takeover.
        #: None when the stream was never resumed.
        self.resumed_time_to_first_token: float | None = None

    def _observe(self, kind: str, detail: str) -> None:
        self._shared.observer.record(kind, self.response_id, self.last_sequence, detail)

    def _begin_call(self, request: pb.StreamRespondRequest) -> float:
        """Notes a call's start; returns the time it has left."""
        self._call_started = time.monotonic()
        self._awaiting_first = True
        self._resuming = request.HasField("resume")
        return self._deadline - self._call_started

    def _received(self, message: pb.StreamRespondResponse) -> None:
        now = time.monotonic()
        self._last_event_at = now
        self._stalled = False
        self._connect_failures = 0
        if self._awaiting_first and message.WhichOneof("event") != "heartbeat":
            self._awaiting_first = False
            if self._resuming:
                self.resumed_time_to_first_token = now - self._call_started

    def _check_stall(self, now: float) -> None:
        """Counts a stall once per silence longer than the client's stall_timeout."""
        timeout = self._shared.stall_timeout
        if self._stalled or timeout is None or self.result is not None:
            return
        silent = now - self._last_event_at
        if silent > timeout:
            self._stalled = True
            self._observe("stall", f"no event for {silent:.1f} s (stall_timeout {timeout:g} s)")

    def _should_resume(self, error: TokenwireError) -> bool:
        return (
            not self._cancelled
            and self._resume is not None
            and self.resumes < self._resume.attempts
            and bool(self._assembler.response_id)
            and worth_resuming(error)
            and time.monotonic() < self._deadline
        )

    def _next_attempt(self, error: TokenwireError, index: int) -> float | None:
        """After a failed call: None to give up, else the seconds to wait before
        the next call (`_next_request` says what it asks)."""
        targets = self._shared.targets
        if never_connected(error) and not self._cancelled:
            self._connect_failures += 1
            if self._connect_failures < len(targets) and time.monotonic() < self._deadline:
                targets.fail_over(index)
                return 0.0  # nothing reached a server: the same request, elsewhere, now
        if not self._should_resume(error):
            return None
        targets.fail_over(index)
        assert self._resume is not None
        self.resumes += 1
        remaining = self._deadline - time.monotonic()
        return min(self._resume.delay(self.resumes - 1), max(0.0, remaining))

    def _next_request(self, request: pb.StreamRespondRequest) -> pb.StreamRespondRequest:
        return self._assembler.resume_request() if self._assembler.response_id else request

    def _missing_completed(self) -> None:
        if self._assembler.result is None:
            raise ProtocolError(
                "stream ended without Completed", last_sequence=self._assembler.last_sequence
            )

    @property
    def result(self) -> Result | None:
        return self._assembler.result

    @property
    def last_sequence(self) -> int:
        return self._assembler.last_sequence

    @property
    def response_id(self) -> str:
        return self._assembler.response_id

    @property
    def text(self) -> str:
        """The text received so far (the final text once completed)."""
        return self._assembler.text

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls received so far; once completed, `Completed.tool_calls`."""
        return self._assembler.tool_calls

    @property
    def request(self) -> pb.StreamRespondRequest:
        """The request this stream started with."""
        return self._request

    def cancel(self) -> None:
        """Cancels the call and any resume still to come; the server stops generation
        (unless the stream is resumable: then `cancel_response` stops it)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


class AsyncResponseStream(_StreamState):
    """An in-progress `StreamRespond`: iterate for events; `result` once completed.

    A resumable stream whose connection drops (UNAVAILABLE without a tokenwire
    error) reconnects with the last sequence it holds and goes on, so the
    caller sees one seamless, verified stream.
    """

    _stall_timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    def _watch_stalls(self) -> None:
        timeout = self._shared.stall_timeout
        if timeout is None:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            self._check_stall(time.monotonic())
            self._stall_timer = loop.call_later(timeout / 4, check)

        self._stall_timer = loop.call_later(timeout / 4, check)

    async def _events(self) -> AsyncIterator[Event]:
        request = self._request
        self._watch_stalls()
        try:
            while True:
                index, stub = self._shared.targets.current()
                remaining = self._begin_call(request)
                call: Any = stub.StreamRespond(
                    request, timeout=remaining, metadata=self._shared.metadata
                )
                self._call = call
                try:
                    if not self._assembler.request_id:
                        self._assembler.request_id = _request_id(
                            list(await call.initial_metadata() or ())
                        )
                    async for message in call:
                        self._received(message)
                        for event in self._assembler.feed(message):
                            yield event
                    break
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
                    delay = self._next_attempt(error, index)
                    if delay is None:
                        raise error from None
                    await asyncio.sleep(delay)
                    if self._cancelled:
                        raise error from None
                    request = self._next_request(request)
                finally:
                    # A caller that stops reading (or a failed check) must stop generation too.
                    if not call.done():
                        call.cancel()
            self._missing_completed()
        finally:
            if self._stall_timer is not None:
                self._stall_timer.cancel()

    async def collect(self) -> Result:
        """Consumes the stream and returns the verified result."""
        async for _ in self:
            pass
        assert self._assembler.result is not None
        return self._assembler.result


class AsyncClient:
    """asyncio client over one channel per address (reuse it: channels are expensive).

    `target` is one `HOST:PORT`, several comma-separated (or a list) to fail
    over between replicas, or a gRPC target URI. `observed` counts the ordering
    violations and stalls this client's streams met (`tokenwire.observed`).
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        resume: ResumePolicy | None = ResumePolicy(),
        api_key: str | None = None,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        on_observation: ObservationHook | None = None,
    ) -> None:
        _check_stall_timeout(stall_timeout)
        if api_key:
            metadata = (*metadata, ("authorization", f"Bearer {api_key}"))
        if channel is not None:
            addresses, channels = ["<channel>"], [channel]
        else:
            addresses = split_targets(target)
            channels = [
                grpc.aio.secure_channel(address, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(address)
                for address in addresses
            ]
        self._targets = _Targets(addresses, channels)
        self._timeout = timeout
        self._shared = _Shared(
            self._targets, tuple(metadata), resume, Observer(on_observation), stall_timeout
        )

    @property
    def observed(self) -> Observed:
        """Ordering violations and stalls met so far (live counters)."""
        return self._shared.observer.counts

    @property
    def targets(self) -> list[str]:
        return list(self._targets.addresses)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._targets.channels:
            await channel.close()

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """One unary call (with its call object), sent to the next address when
        it could not connect at all."""
        deadline = time.monotonic() + (timeout or self._timeout)
        failures = 0
        while True:
            index, stub = self._targets.current()
            call = getattr(stub, method)(
                request, timeout=deadline - time.monotonic(), metadata=self._shared.metadata
            )
            try:
                return await call, call
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                failures += 1
                if not never_connected(error) or failures >= len(self._targets):
                    raise error from None
                self._targets.fail_over(index)

    def stream_request(
        self,
        request: pb.StreamRespondRequest,
        *,
        timeout: float | None = None,
        assembler: StreamAssembler | None = None,
    ) -> AsyncResponseStream:
        return AsyncResponseStream(self._shared, request, timeout or self._timeout, assembler)

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[StreamOptions]
    ) -> AsyncResponseStream:
        """Starts a `StreamRespond`; options are those of `build_stream_request`."""
        return self.stream_request(build_stream_request(prompt, **options), timeout=timeout)

    async def respond_request(
        self, request: pb.RespondRequest, *, timeout: float | None = None
    ) -> Result:
        response, call = await self._unary("Respond", request, timeout)
        try:
            request_id = _request_id(list(await call.initial_metadata() or ()))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return unary_result(response, request_id)

    async def respond(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[RespondOptions]
    ) -> Result:
        """Calls unary `Respond`; options are those of `build_respond_request`."""
        return await self.respond_request(build_respond_request(prompt, **options), timeout=timeout)

    async def cancel_response(self, response_id: str, *, timeout: float | None = None) -> bool:
        """Stops a response by id (`Cancel`); True when it was still running."""
        answer, _ = await self._unary("Cancel", pb.CancelRequest(response_id=response_id), timeout)
        return bool(answer.was_running)


class ResponseStream(_StreamState):
    """Blocking counterpart of `AsyncResponseStream` (resumes the same way)."""

    def __iter__(self) -> Iterator[Event]:
        watch = self._shared.watch
        if watch is not None:
            watch.add(self)
        try:
            yield from self._events()
        finally:
            if watch is not None:
                watch.discard(self)

    def _events(self) -> Iterator[Event]:
        request = self._request
        while True:
            index, stub = self._shared.targets.current()
            remaining = self._begin_call(request)
            call: Any = stub.StreamRespond(
                request, timeout=remaining, metadata=self._shared.metadata
            )
            self._call = call
            try:
                if not self._assembler.request_id:
                    self._assembler.request_id = _request_id(list(call.initial_metadata() or ()))
                for message in call:
                    self._received(message)
                    yield from self._assembler.feed(message)
                break
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                delay = self._next_attempt(error, index)
                if delay is None:
                    raise error from None
                time.sleep(delay)
                if self._cancelled:
                    raise error from None
                request = self._next_request(request)
            finally:
                if call.is_active():
                    call.cancel()
        self._missing_completed()

    def collect(self) -> Result:
        for _ in self:
            pass
        assert self._assembler.result is not None
        return self._assembler.result


class Client:
    """Blocking client over one channel per address; safe to share between threads.

    `target`, `observed` and the rest are as for `AsyncClient`; a stall is
    noticed by one daemon thread per client (while it has streams open).
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
        resume: ResumePolicy | None = ResumePolicy(),
        api_key: str | None = None,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        on_observation: ObservationHook | None = None,
    ) -> None:
        _check_stall_timeout(stall_timeout)
        if api_key:
            metadata = (*metadata, ("authorization", f"Bearer {api_key}"))
        if channel is not None:
            addresses, channels = ["<channel>"], [channel]
        else:
            addresses = split_targets(target)
            channels = [
                grpc.secure_channel(address, credentials)
                if credentials is not None
                else grpc.insecure_channel(address)
                for address in addresses
            ]
        self._targets = _Targets(addresses, channels)
        self._timeout = timeout
        self._shared = _Shared(
            self._targets,
            tuple(metadata),
            resume,
            Observer(on_observation),
            stall_timeout,
            _StallWatch(stall_timeout) if stall_timeout is not None else None,
        )

    @property
    def observed(self) -> Observed:
        """Ordering violations and stalls met so far (live counters)."""
        return self._shared.observer.counts

    @property
    def targets(self) -> list[str]:
        return list(self._targets.addresses)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._shared.watch is not None:
            self._shared.watch.close()
        for channel in self._targets.channels:
            channel.close()

    def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """One unary call (response and call), sent to the next address when it
        could not connect at all."""
        deadline = time.monotonic() + (timeout or self._timeout)
        failures = 0
        while True:
            index, stub = self._targets.current()
            try:
                return getattr(stub, method).with_call(
                    request, timeout=deadline - time.monotonic(), metadata=self._shared.metadata
                )
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                failures += 1
                if not never_connected(error) or failures >= len(self._targets):
                    raise error from None
                self._targets.fail_over(index)

    def stream_request(
        self,
        request: pb.StreamRespondRequest,
        *,
        timeout: float | None = None,
        assembler: StreamAssembler | None = None,
    ) -> ResponseStream:
        return ResponseStream(self._shared, request, timeout or self._timeout, assembler)

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[StreamOptions]
    ) -> ResponseStream:
        return self.stream_request(build_stream_request(prompt, **options), timeout=timeout)

    def respond_request(
        self, request: pb.RespondRequest, *, timeout: float | None = None
    ) -> Result:
        response, call = self._unary("Respond", request, timeout)
        return unary_result(response, _request_id(call.initial_metadata()))

    def respond(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[RespondOptions]
    ) -> Result:
        return self.respond_request(build_respond_request(prompt, **options), timeout=timeout)

    def cancel_response(self, response_id: str, *, timeout: float | None = None) -> bool:
        """Stops a response by id (`Cancel`); True when it was still running."""
        answer, _ = self._unary("Cancel", pb.CancelRequest(response_id=response_id), timeout)
        return bool(answer.was_running)
