"""tokenwire clients: `AsyncClient` for asyncio callers, `Client` for threads.

Both set a deadline on every call by default (a call without one can hang
forever behind a stuck proxy), check every chunk (`tokenwire.stream`), and
raise the typed errors of `tokenwire.errors`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

import grpc
from google.protobuf import duration_pb2

from tokenwire.errors import ProtocolError, TokenwireError, from_rpc_error
from tokenwire.stream import Event, Result, StreamAssembler, unary_result, worth_resuming
from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 60.0
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
) -> pb.StreamRespondRequest:
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
    return request


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
) -> pb.RespondRequest:
    return pb.RespondRequest(
        request_id=request_id,
        model=model,
        messages=_messages(prompt, system),
        params=_params(max_tokens, temperature, top_p, stop, seed),
        labels=dict(labels or {}),
    )


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


class _StreamState:
    """What the sync and async streams share: the checks, the resume decision, cancel."""

    def __init__(
        self,
        stub: respond_pb2_grpc.RespondServiceStub,
        request: pb.StreamRespondRequest,
        timeout: float,
        metadata: Sequence[tuple[str, str]],
        resume: ResumePolicy | None,
        assembler: StreamAssembler | None = None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._deadline = time.monotonic() + timeout
        self._metadata = metadata
        self._resume = resume if request.resumable else None
        self._assembler = assembler or StreamAssembler()
        self._call: Any = None
        self._cancelled = False
        self.resumes = 0

    def _should_resume(self, error: TokenwireError) -> bool:
        return (
            not self._cancelled
            and self._resume is not None
            and self.resumes < self._resume.attempts
            and bool(self._assembler.response_id)
            and worth_resuming(error)
            and time.monotonic() < self._deadline
        )

    def _resume_delay(self, remaining: float) -> float:
        assert self._resume is not None
        self.resumes += 1
        return min(self._resume.delay(self.resumes - 1), max(0.0, remaining))

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

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        request = self._request
        while True:
            remaining = self._deadline - time.monotonic()
            call: Any = self._stub.StreamRespond(
                request, timeout=remaining, metadata=tuple(self._metadata)
            )
            self._call = call
            try:
                if not self._assembler.request_id:
                    self._assembler.request_id = _request_id(
                        list(await call.initial_metadata() or ())
                    )
                async for message in call:
                    for event in self._assembler.feed(message):
                        yield event
                break
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if not self._should_resume(error):
                    raise error from None
                await asyncio.sleep(self._resume_delay(remaining))
                if self._cancelled:
                    raise error from None
                request = self._assembler.resume_request()
            finally:
                # A caller that stops reading (or a failed check) must stop generation too.
                if not call.done():
                    call.cancel()
        self._missing_completed()

    async def collect(self) -> Result:
        """Consumes the stream and returns the verified result."""
        async for _ in self:
            pass
        assert self._assembler.result is not None
        return self._assembler.result


class AsyncClient:
    """asyncio client over one channel (reuse it: channels are expensive)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        resume: ResumePolicy | None = ResumePolicy(),
        api_key: str | None = None,
    ) -> None:
        self._resume = resume
        if api_key:
            metadata = (*metadata, ("authorization", f"Bearer {api_key}"))
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        self._stub = respond_pb2_grpc.RespondServiceStub(channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

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
        await self._channel.close()

    def stream_request(
        self,
        request: pb.StreamRespondRequest,
        *,
        timeout: float | None = None,
        assembler: StreamAssembler | None = None,
    ) -> AsyncResponseStream:
        return AsyncResponseStream(
            self._stub, request, timeout or self._timeout, self._metadata, self._resume, assembler
        )

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[StreamOptions]
    ) -> AsyncResponseStream:
        """Starts a `StreamRespond`; options are those of `build_stream_request`."""
        return self.stream_request(build_stream_request(prompt, **options), timeout=timeout)

    async def respond_request(
        self, request: pb.RespondRequest, *, timeout: float | None = None
    ) -> Result:
        call = self._stub.Respond(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            response = await call
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
        try:
            answer = await self._stub.Cancel(
                pb.CancelRequest(response_id=response_id),
                timeout=timeout or self._timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return bool(answer.was_running)


class ResponseStream(_StreamState):
    """Blocking counterpart of `AsyncResponseStream` (resumes the same way)."""

    def __iter__(self) -> Iterator[Event]:
        request = self._request
        while True:
            remaining = self._deadline - time.monotonic()
            call: Any = self._stub.StreamRespond(
                request, timeout=remaining, metadata=tuple(self._metadata)
            )
            self._call = call
            try:
                if not self._assembler.request_id:
                    self._assembler.request_id = _request_id(list(call.initial_metadata() or ()))
                for message in call:
                    yield from self._assembler.feed(message)
                break
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if not self._should_resume(error):
                    raise error from None
                time.sleep(self._resume_delay(remaining))
                if self._cancelled:
                    raise error from None
                request = self._assembler.resume_request()
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
    """Blocking client over one channel; safe to share between threads."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
        resume: ResumePolicy | None = ResumePolicy(),
        api_key: str | None = None,
    ) -> None:
        self._resume = resume
        if api_key:
            metadata = (*metadata, ("authorization", f"Bearer {api_key}"))
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials)
                if credentials is not None
                else grpc.insecure_channel(target)
            )
        self._channel = channel
        self._stub = respond_pb2_grpc.RespondServiceStub(channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

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
        self._channel.close()

    def stream_request(
        self,
        request: pb.StreamRespondRequest,
        *,
        timeout: float | None = None,
        assembler: StreamAssembler | None = None,
    ) -> ResponseStream:
        return ResponseStream(
            self._stub, request, timeout or self._timeout, self._metadata, self._resume, assembler
        )

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[StreamOptions]
    ) -> ResponseStream:
        return self.stream_request(build_stream_request(prompt, **options), timeout=timeout)

    def respond_request(
        self, request: pb.RespondRequest, *, timeout: float | None = None
    ) -> Result:
        try:
            response, call = self._stub.Respond.with_call(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return unary_result(response, _request_id(call.initial_metadata()))

    def respond(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[RespondOptions]
    ) -> Result:
        return self.respond_request(build_respond_request(prompt, **options), timeout=timeout)

    def cancel_response(self, response_id: str, *, timeout: float | None = None) -> bool:
        """Stops a response by id (`Cancel`); True when it was still running."""
        try:
            answer = self._stub.Cancel(
                pb.CancelRequest(response_id=response_id),
                timeout=timeout or self._timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return bool(answer.was_running)
