"""OTLP span export from the event loop: each span encoded as it ends, batches
posted without a thread of their own.

The SDK's BatchSpanProcessor encodes and posts whole batches from a worker
thread. Under the GIL that thread takes turns with the event loop: a 32-span
batch costs ~1.6 ms to encode and ~0.6 ms of `requests` to post, and requests
arriving meanwhile waited for it. With every span exported, the p99 time to
first token through the upstream path rose by about 3 ms
(bench/upstream_path.py). Here a span is encoded (span_encoding.py: the
OpenTelemetry span encoder inside an envelope encoded once) by a callback
scheduled right after it ends, so the work lands between calls in small
pieces, and batches go out through aiohttp or
grpc.aio on the loop itself, yielding at every await.

A batch is the concatenation of its spans' encoded requests: protobuf merges
repeated fields on concatenation, so the join of several serialized
`ExportTraceServiceRequest`s is one valid request (one `ResourceSpans` per span).

Why one module: encoding, batching, the two transports and the drain flush
share one queue and one failure count.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
import grpc
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.util.re import parse_env_headers

from tokenwire_server.observability.span_encoding import SpanEncoder

log = logging.getLogger(__name__)

_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_RETRYABLE_GRPC = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
_ATTEMPTS = 3


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how spans go, from the standard OTEL_EXPORTER_OTLP_* variables."""

    protocol: str  # "grpc" or "http/protobuf"
    endpoint: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    gzip: bool = False
    certificate: str | None = None
    client_key: str | None = None
    client_certificate: str | None = None
    insecure: bool | None = None


def _traces_or_common(env: Mapping[str, str], name: str) -> str | None:
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")


def otlp_target(env: Mapping[str, str]) -> OtlpTarget | None:
    """The export target the environment asks for, or None when traces stay local."""
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    common_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen in ("none", "console") or (
        chosen != "otlp" and not (traces_endpoint or common_endpoint)
    ):
        return None
    protocol = _traces_or_common(env, "PROTOCOL") or "grpc"
    http = protocol.startswith("http")
    if traces_endpoint:
        endpoint = traces_endpoint
    elif http:
        # The per-signal path is added to the common endpoint, never to the traces one.
        endpoint = (common_endpoint or "http://localhost:4318").rstrip("/") + "/v1/traces"
    else:
        endpoint = common_endpoint or "http://localhost:4317"
    insecure = _traces_or_common(env, "INSECURE")
    try:
        timeout = float(_traces_or_common(env, "TIMEOUT") or 10)
    except ValueError:
        log.warning("OTEL_EXPORTER_OTLP_TIMEOUT is not a number; using 10 seconds")
        timeout = 10.0
    return OtlpTarget(
        protocol="http/protobuf" if http else "grpc",
        endpoint=endpoint,
        headers=parse_env_headers(_traces_or_common(env, "HEADERS") or "", liberal=True),
        timeout=timeout,
        gzip=(_traces_or_common(env, "COMPRESSION") or "").strip().lower() == "gzip",
        certificate=_traces_or_common(env, "CERTIFICATE"),
        client_key=_traces_or_common(env, "CLIENT_KEY"),
        client_certificate=_traces_or_common(env, "CLIENT_CERTIFICATE"),
        insecure=None if insecure is None else insecure.strip().lower() == "true",
    )


class _Refused(Exception):
    """The collector rejected a request for good: sending it again cannot help."""


class _Sender:
    async def send(self, body: bytes) -> bool:
        """Posts one request, again after a back-off while the collector's answer is
        transient; True once the collector accepted it."""
        data = self._encode(body)
        problem: str | None = None
        for attempt in range(_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            try:
                problem = await self._attempt(data)
            except _Refused as refusal:
                log.warning("span export refused: %s", refusal)
                return False
            if problem is None:
                return True
        log.warning("span export failed after %d attempts: %s", _ATTEMPTS, problem)
        return False

    def _encode(self, body: bytes) -> bytes:
        """The body as the transport sends it; once per request, not per attempt."""
        return body

    async def _attempt(self, data: bytes) -> str | None:
        """Posts once: None when accepted, the reason when worth another attempt;
        raises `_Refused` when not."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Releases connections."""


def _ssl_context(target: OtlpTarget) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=target.certificate)
    if target.client_certificate:
        context.load_cert_chain(target.client_certificate, target.client_key)
    return context


class _HttpSender(_Sender):
    """OTLP/HTTP with binary protobuf bodies."""

    def __init__(self, target: OtlpTarget) -> None:
        self._target = target
        self._headers = {**target.headers, "Content-Type": "application/x-protobuf"}
        if target.gzip:
            self._headers["Content-Encoding"] = "gzip"
        #: True: aiohttp's default verification; a context when a CA or client cert is set.
        self._ssl: ssl.SSLContext | bool = (
            _ssl_context(target)
            if target.endpoint.startswith("https:")
            and (target.certificate or target.client_certificate)
            else True
        )
        self._session: aiohttp.ClientSession | None = None

    def _encode(self, body: bytes) -> bytes:
        return gzip.compress(body, compresslevel=6) if self._target.gzip else body

    async def _attempt(self, data: bytes) -> str | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._target.timeout)
            )
        try:
            async with self._session.post(
                self._target.endpoint, data=data, headers=self._headers, ssl=self._ssl
            ) as reply:
                await reply.read()
                if reply.status < 300:
                    return None
                if reply.status not in _RETRYABLE_HTTP:
                    raise _Refused(f"HTTP {reply.status}")
                return f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            return repr(error)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _GrpcSender(_Sender):
    """OTLP/gRPC: bytes in, bytes out, through a generic unary call."""

    def __init__(self, target: OtlpTarget) -> None:
        self._target = target
        parsed = urlparse(target.endpoint if "://" in target.endpoint else f"//{target.endpoint}")
        address = parsed.netloc or target.endpoint
        # As the SDK decides: the scheme when there is one, else TLS unless INSECURE=true.
        secure = parsed.scheme == "https" or (parsed.scheme == "" and target.insecure is not True)
        self._channel: grpc.aio.Channel | None = None
        self._address, self._secure = address, secure
        self._metadata = tuple((key.lower(), value) for key, value in target.headers.items())

    def _open(self) -> grpc.aio.Channel:
        target = self._target
        if not self._secure:
            return grpc.aio.insecure_channel(self._address)

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        credentials = grpc.ssl_channel_credentials(
            read(target.certificate), read(target.client_key), read(target.client_certificate)
        )
        return grpc.aio.secure_channel(self._address, credentials)

    async def _attempt(self, data: bytes) -> str | None:
        if self._channel is None:
            self._channel = self._open()
        export: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            _EXPORT_METHOD
        )
        try:
            await export(
                data,
                timeout=self._target.timeout,
                metadata=self._metadata,
                compression=grpc.Compression.Gzip if self._target.gzip else None,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRYABLE_GRPC:
                raise _Refused(f"{error.code().name} {error.details()}") from None
            return str(error.code().name)
        return None

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def sender_for(target: OtlpTarget) -> _Sender:
    return _HttpSender(target) if target.protocol == "http/protobuf" else _GrpcSender(target)


class LoopSpanProcessor(SpanProcessor):
    """Queues ended spans, encodes them on the loop, posts batches from the loop.

    Limits follow the SDK's OTEL_BSP_* meaning: at most `max_queue` spans wait
    (more are dropped and counted), a batch goes out once `max_batch` spans
    are encoded or `schedule_delay` after the first one waited.
    """

    def __init__(
        self,
        sender: _Sender,
        *,
        max_batch: int = 512,
        max_queue: int = 2048,
        schedule_delay: float = 5.0,
    ) -> None:
        self._sender = sender
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._schedule_delay = schedule_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: list[ReadableSpan] = []
        self._encoded: list[bytes] = []
        self._encoder = SpanEncoder()
        self._encode_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._posting: asyncio.Task[None] | None = None
        self._closed = False
        #: Spans dropped because the queue was full (or no loop could post them).
        self.dropped = 0
        #: Spans the collector accepted.
        self.exported = 0
        #: Spans in batches the collector refused or that could not reach it.
        self.failed = 0
        #: Told each outcome ("exported", "dropped", "failed") and its span count.
        self.on_outcome: Callable[[str, int], None] | None = None

    def _count(self, outcome: str, count: int) -> None:
        if outcome == "exported":
            self.exported += count
        elif outcome == "failed":
            self.failed += count
        else:
            self.dropped += count
        if self.on_outcome is not None:
            self.on_outcome(outcome, count)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if self._closed or context is None or not context.trace_flags.sampled:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None:
            self._loop = running
        if self._loop is None:
            self._count("dropped", 1)  # no loop has ever run here: nothing could post it
        elif running is self._loop:
            self._enqueue(span)
        else:
            try:
                self._loop.call_soon_threadsafe(self._enqueue, span)
            except RuntimeError:  # that loop is closed: the span has nowhere to go
                self._count("dropped", 1)

    def _enqueue(self, span: ReadableSpan) -> None:
        if len(self._ended) + len(self._encoded) >= self._max_queue:
            if self.dropped == 0:
                log.warning("span export queue full (%d); dropping spans", self._max_queue)
            self._count("dropped", 1)
            return
        self._ended.append(span)
        if not self._encode_scheduled:
            # After the current step: the span's call finishes sending first.
            self._encode_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._encode)

    def _encode(self) -> None:
        self._encode_scheduled = False
        ended, self._ended = self._ended, []
        for span in ended:
            try:
                self._encoded.append(self._encoder.request(span))
            except Exception:  # a span the encoder rejects must not stop the others
                log.exception("could not encode span %s", span.name)
        if len(self._encoded) >= self._max_batch:
            self._post()
        elif self._encoded and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self._schedule_delay, self._post)

    def _post(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._posting is None or self._posting.done():
            assert self._loop is not None
            self._posting = self._loop.create_task(self._post_all())

    async def _post_all(self) -> None:
        while self._encoded:
            batch = self._encoded[: self._max_batch]
            del self._encoded[: len(batch)]
            try:
                accepted = await self._sender.send(b"".join(batch))
            except Exception:  # e.g. a malformed endpoint: tell, drop the batch, go on
                log.exception("span export failed; %d spans dropped", len(batch))
                accepted = False
            self._count("exported" if accepted else "failed", len(batch))

    async def aclose(self, timeout: float = 5.0) -> None:
        """Posts what is queued (for at most `timeout` seconds), then stops."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._encode()
            self._post()
            assert self._posting is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._posting), timeout)
            except TimeoutError:
                log.warning("span export did not finish within %.1f s", timeout)
                self._posting.cancel()
        await self._sender.aclose()

    def shutdown(self) -> None:
        """The SDK's synchronous shutdown cannot wait for the loop: `aclose` posts."""
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """True when nothing is waiting; posting happens on the loop, not here."""
        return not (self._ended or self._encoded)


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        log.warning("%s is not an integer; using %d", name, default)
        return default


def span_processor(env: Mapping[str, str]) -> LoopSpanProcessor | None:
    target = otlp_target(env)
    if target is None:
        return None
    log.info("exporting traces over OTLP (%s) to %s", target.protocol, target.endpoint)
    return LoopSpanProcessor(
        sender_for(target),
        max_batch=_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        max_queue=_int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        schedule_delay=_int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
    )


__all__: Sequence[str] = ("LoopSpanProcessor", "OtlpTarget", "otlp_target", "span_processor")
