"""An OpenAI-compatible upstream: vLLM, llama.cpp server, TGI, Ollama, hosted APIs.

Streaming goes to `POST {base_url}/chat/completions` with `stream: true` over
Server-Sent Events, on an aiohttp session with pooled keep-alive connections:
its C HTTP parser and whole-read SSE decoding keep the cost per token small
enough that tokenwire adds little in front of an upstream (see
bench/upstream_path.py; a pure-Python HTTP stack cost several milliseconds of
CPU per call and tens of microseconds per token). What happens when it fails
depends on when:

* Before the first token (connection refused, 5xx, 429, a stream that breaks
  at once): retry with exponential backoff and jitter, then one
  non-streaming request, then the next upstream in the route's fallback
  list. `Finish` reports the path, the number of upstream requests and the
  upstream that served, so `Completed.serving` never hides a fallback.
* After the first token: tokens already released are never repeated or
  contradicted, so there is no silent retry; the call ends with UNAVAILABLE
  (`UPSTREAM_FAILED_MID_STREAM`) naming the last delivered sequence, and the
  caller can retry. Continuing the answer with the delivered text as an
  assistant prefix is not attempted: the OpenAI API has no portable way to
  ask for a continuation rather than a new turn.

Cancellation closes the HTTP stream at once (leaving the response's context
before its end closes the connection), and every request's read timeout is
bounded by the call's remaining deadline.

Why one module: streaming, the non-streaming fallback and the retry rules
share one request builder and one failure classification; apart, the rule
for "may this be retried" would live in two places.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
from opentelemetry import propagate

from tokenwire_server.backends.base import Backend
from tokenwire_server.backends.sse import SSEDecoder
from tokenwire_server.config import UpstreamConfig
from tokenwire_server.domain import Finish, FinishReason, GenerationRequest, Role, ServingPath
from tokenwire_server.errors import BackendUnavailable, DeadlineExceeded, InvalidRequest

_ROLES = {Role.SYSTEM: "system", Role.USER: "user", Role.ASSISTANT: "assistant"}
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}
_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_REJECTED_STATUS = {400, 404, 413, 422}
#: How long to wait for the end of the body after `[DONE]` to keep the connection.
_DRAIN_GRACE = 0.05


@dataclass
class UpstreamError(Exception):
    """A failed upstream request; `retryable` says whether another try may succeed."""

    message: str
    retryable: bool
    status: int = 0


def _error_message(status: int, body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error", {})
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    return f"upstream HTTP {status}: {message or body[:200].decode(errors='replace')}"


class OpenAICompatibleBackend(Backend):
    """One route: a tokenwire model name served by one upstream (plus fallbacks)."""

    #: The API it speaks, whoever hosts it (vLLM, Ollama, a hosted API).
    provider = "openai"

    def __init__(self, upstream: UpstreamConfig, env: Mapping[str, str]) -> None:
        self.name = upstream.name
        self.config = upstream
        self.model = upstream.model or upstream.name
        self.upstream_model = upstream.upstream_model or self.model
        self._url = upstream.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"accept": "text/event-stream"}
        if upstream.api_key_env:
            key = env.get(upstream.api_key_env, "")
            if key:
                self._headers["authorization"] = f"Bearer {key}"
        #: Created on first use: an aiohttp session belongs to the running loop.
        self._session: aiohttp.ClientSession | None = None
        #: Routes tried, in order, when this one fails before its first token.
        self.fallbacks: list[OpenAICompatibleBackend] = []
        self._rng = random.Random()

    def models(self) -> Mapping[str, str]:
        return {self.model: self.upstream_model}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # No pool limit: concurrency is bounded by tokenwire's own admission.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                raise_for_status=False,
            )
        return self._session

    def _body(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "messages": [{"role": _ROLES[m.role], "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def _timeout(self, request: GenerationRequest) -> aiohttp.ClientTimeout:
        """Per-read timeout (silence between reads), bounded by the call's deadline."""
        read = self.config.read_timeout
        if request.deadline is not None:
            remaining = request.deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise DeadlineExceeded("the call's deadline passed before the upstream request")
            read = min(read, remaining)
        return aiohttp.ClientTimeout(
            total=None, sock_connect=min(self.config.connect_timeout, read), sock_read=read
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str | list[str] | Finish]:
        attempts = 0
        last: UpstreamError | None = None
        for route in (self, *self.fallbacks):
            if route.config.stream:
                for attempt in range(route.config.max_retries + 1):
                    attempts += 1
                    started = False
                    try:
                        async for item in route._stream(request):
                            if isinstance(item, Finish):
                                yield replace(item, attempts=attempts, backend=route.name)
                                return
                            started = True
                            yield item
                        return
                    except UpstreamError as error:
                        if started:
                            raise BackendUnavailable(
                                f"{route.name}: {error.message} after the first token",
                                reason="UPSTREAM_FAILED_MID_STREAM",
                                metadata={"upstream": route.name},
                            ) from None
                        last = error
                        if not error.retryable:
                            break
                        if attempt < route.config.max_retries:
                            await self._backoff(request, attempt)
            attempts += 1
            try:
                text, finish = await route._complete(request)
            except UpstreamError as error:
                last = error
                continue
            if text:
                yield text
            yield replace(finish, attempts=attempts, backend=route.name)
            return
        assert last is not None
        if last.status in _REJECTED_STATUS:
            raise InvalidRequest(last.message, reason="UPSTREAM_REJECTED")
        raise BackendUnavailable(
            last.message, reason="UPSTREAM_UNAVAILABLE", metadata={"attempts": str(attempts)}
        )

    async def _backoff(self, request: GenerationRequest, attempt: int) -> None:
        delay = self.config.retry_backoff * (2**attempt) * (0.5 + self._rng.random())
        if request.deadline is not None:
            delay = min(delay, max(0.0, request.deadline - asyncio.get_running_loop().time()))
        await asyncio.sleep(delay)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[list[str] | Finish]:
        body = self._body(request, stream=True)
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        count = 0
        done = False
        try:
            async with self._client().post(
                self._url,
                data=orjson.dumps(body),
                timeout=self._timeout(request),
                headers=_trace_headers(),
            ) as response:
                if response.status != 200:
                    raise UpstreamError(
                        _error_message(response.status, await response.read()),
                        retryable=response.status in _RETRYABLE_STATUS or response.status >= 500,
                        status=response.status,
                    )
                decoder = SSEDecoder()
                reads = response.content.iter_any()
                while not done:
                    read = await anext(reads, None)
                    # Every token of one read goes on as one batch (see Backend.generate).
                    batch: list[str] = []
                    for data in decoder.feed(read) if read is not None else decoder.close():
                        if data == b"[DONE]":
                            done = True
                            break
                        event = _parse_event(data)
                        for choice in event.get("choices") or ():
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                batch.append(content)
                            finish_reason = choice.get("finish_reason") or finish_reason
                        usage = event.get("usage") or usage
                    if batch:
                        count += len(batch)
                        yield batch
                    if read is None:
                        break
                if done:
                    await _drain(response)
                elif finish_reason is None:
                    raise UpstreamError("upstream stream ended before it finished", retryable=True)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamError(
                f"upstream {type(error).__name__}: {error}", retryable=True
            ) from None
        yield Finish(
            reason=_FINISH.get(finish_reason or "stop", FinishReason.STOP),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", count),
            path=ServingPath.STREAMING,
        )

    async def _complete(self, request: GenerationRequest) -> tuple[str, Finish]:
        try:
            async with self._client().post(
                self._url,
                data=orjson.dumps(self._body(request, stream=False)),
                timeout=self._timeout(request),
                headers=_trace_headers(),
            ) as response:
                status = response.status
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamError(
                f"upstream {type(error).__name__}: {error}", retryable=True
            ) from None
        if status != 200:
            raise UpstreamError(
                _error_message(status, content), retryable=status >= 500, status=status
            )
        payload = _parse_event(content)
        choices = payload.get("choices") or [{}]
        text = (choices[0].get("message") or {}).get("content") or ""
        usage = payload.get("usage") or {}
        return text, Finish(
            reason=_FINISH.get(choices[0].get("finish_reason") or "stop", FinishReason.STOP),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            path=ServingPath.NON_STREAMING,
        )


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Reads what follows `[DONE]` (normally just the end of the chunked body,
    often already here), so the connection goes back to the pool instead of
    being closed: a new TCP connection per call costs more than the rest of
    the time to first token. An upstream that keeps the stream open after
    `[DONE]` gets a short grace and is then cut, as before."""
    if response.content.at_eof():
        return
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(_DRAIN_GRACE):
            while await response.content.readany():
                pass


def _trace_headers() -> dict[str, str]:
    """W3C traceparent (and baggage) of the current span, for the upstream."""
    headers: dict[str, str] = {"content-type": "application/json"}
    propagate.inject(headers)
    return headers


def _parse_event(data: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"upstream sent invalid JSON: {data[:120]!r}", retryable=True) from None
    if not isinstance(event, dict):
        raise UpstreamError("upstream sent a non-object event", retryable=True)
    if "error" in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise UpstreamError(f"upstream error: {message}", retryable=False)
    return event
