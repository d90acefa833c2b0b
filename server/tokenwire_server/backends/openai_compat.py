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

Tool calls and structured output map both ways: `tools`, `tool_choice` and
`response_format` go out in the API's own shapes, assistant turns carry their
`tool_calls` and tool results go back as `role: tool` messages; streamed
`delta.tool_calls` come back as `ToolCallFragment`s (id and name on each
call's first fragment only, whatever the upstream repeats), in their order
among the text tokens.

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

from tokenwire_server.backends.base import Backend, BackendItem, new_tool_call_id
from tokenwire_server.backends.sse import SSEDecoder
from tokenwire_server.config import UpstreamConfig
from tokenwire_server.domain import (
    Finish,
    FinishReason,
    GenerationRequest,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    ServingPath,
    ToolCallFragment,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from tokenwire_server.errors import BackendUnavailable, DeadlineExceeded, InvalidRequest

_ROLES = {Role.SYSTEM: "system", Role.USER: "user", Role.ASSISTANT: "assistant", Role.TOOL: "tool"}
_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    # The deprecated single-function form some servers still report.
    "function_call": FinishReason.TOOL_CALLS,
}
_TOOL_CHOICE_MODES = {
    ToolChoiceMode.AUTO: "auto",
    ToolChoiceMode.NONE: "none",
    ToolChoiceMode.REQUIRED: "required",
}
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
    waits_on_network = True

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
            "messages": [_message(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "stream": stream,
        }
        if request.tools:
            body["tools"] = [_tool(t) for t in request.tools]
            if request.tool_choice is not None:
                body["tool_choice"] = _tool_choice(request.tool_choice)
        if request.response_format is not None and request.response_format.is_json:
            body["response_format"] = _response_format(request.response_format)
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

    async def generate(self, request: GenerationRequest) -> AsyncIterator[BackendItem]:
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
                items, finish = await route._complete(request)
            except UpstreamError as error:
                last = error
                continue
            for piece in items:
                yield piece
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

    async def _stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[list[str] | ToolCallFragment | Finish]:
        body = self._body(request, stream=True)
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        count = 0
        done = False
        calls: _ToolCallDeltas | None = None
        try:
            async with self._client().post(
                self._url,
                data=_dumps(body),
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
                            delta = choice.get("delta") or {}
                            content = delta.get("content")
                            if content:
                                batch.append(content)
                                if not count:
                                    # The first token goes on alone: its chunk can
                                    # leave before the rest of this read is parsed.
                                    count = 1
                                    yield batch
                                    batch = []
                            deltas = delta.get("tool_calls")
                            if deltas:
                                # Text before the call goes first: the order is the model's.
                                if batch:
                                    count += len(batch)
                                    yield batch
                                    batch = []
                                if calls is None:
                                    calls = _ToolCallDeltas()
                                for fragment in calls.feed(deltas):
                                    count += 1
                                    yield fragment
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
        if calls is not None:
            for fragment in calls.close():
                count += 1
                yield fragment
        yield Finish(
            reason=_finish_reason(finish_reason, calls is not None and calls.started > 0),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", count),
            path=ServingPath.STREAMING,
        )

    async def _complete(
        self, request: GenerationRequest
    ) -> tuple[list[str | ToolCallFragment], Finish]:
        try:
            async with self._client().post(
                self._url,
                data=_dumps(self._body(request, stream=False)),
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
        message = choices[0].get("message") or {}
        text = message.get("content") or ""
        items: list[str | ToolCallFragment] = [text] if text else []
        calls = _message_tool_calls(message.get("tool_calls"))
        items.extend(calls)
        usage = payload.get("usage") or {}
        return items, Finish(
            reason=_finish_reason(choices[0].get("finish_reason"), bool(calls)),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            path=ServingPath.NON_STREAMING,
        )


def _finish_reason(reason: str | None, called_tools: bool) -> FinishReason:
    """The upstream's finish reason as the enum. A response that called tools
    and stopped naturally is TOOL_CALLS even when the upstream says "stop"
    (some servers do): the caller must run the calls either way."""
    mapped = _FINISH.get(reason or "stop", FinishReason.STOP)
    if called_tools and mapped is FinishReason.STOP:
        return FinishReason.TOOL_CALLS
    return mapped


# Request mapping. ------------------------------------------------------------


def _message(message: Message) -> dict[str, Any]:
    """One chat message in the API's shape: an assistant turn that called tools
    carries them (content null when it said nothing), a tool result names the
    call it answers."""
    if message.role is Role.TOOL:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.tool_calls:
        return {
            "role": _ROLES[message.role],
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ],
        }
    return {"role": _ROLES[message.role], "content": message.content}


def _tool(tool: ToolSpec) -> dict[str, Any]:
    """A function tool; empty fields are left out (some servers reject an empty
    description or a null schema rather than ignore them)."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.function_name:
        return {"type": "function", "function": {"name": choice.function_name}}
    return _TOOL_CHOICE_MODES[choice.mode]


def _response_format(response_format: ResponseFormat) -> dict[str, Any]:
    if response_format.type is ResponseFormatType.JSON_OBJECT:
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": response_format.schema_name or "response",
            "schema": response_format.schema if response_format.schema is not None else {},
            "strict": response_format.strict,
        },
    }


def _plain(value: object) -> object:
    """orjson's fallback for what it cannot write itself: a schema held in a
    read-only Mapping (the domain types freeze them) goes out as an object."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, default=_plain)


# Response mapping. -----------------------------------------------------------


class _ToolCallDeltas:
    """Streamed `delta.tool_calls` items turned into `ToolCallFragment`s.

    Upstreams differ: most send `id` and `function.name` on a call's first
    delta only, some repeat them on every delta (llama-cpp-python), some put
    arguments in the first delta and some an empty string, a few leave out
    `index` when there is one call at a time. The fragments are uniform
    whatever came in: a call's first fragment carries its id (made up when
    the upstream never sent one) and name, later ones only new arguments; an
    empty piece of arguments after the first fragment is dropped. A call's
    arguments that arrive before its name are held until the name does, so
    the first fragment always names the function.
    """

    __slots__ = ("_calls", "_last", "started")

    def __init__(self) -> None:
        #: Upstream index -> [our index, id, name, held arguments, announced].
        self._calls: dict[object, list[Any]] = {}
        self._last: object = None
        #: Calls announced so far (their first fragment went out).
        self.started = 0

    def feed(self, deltas: list[Any]) -> list[ToolCallFragment]:
        out: list[ToolCallFragment] = []
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            function = delta.get("function") or {}
            key = delta.get("index")
            if key is None:
                key = self._key_without_index(delta.get("id"))
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = [len(self._calls), "", "", "", False]
            self._last = key
            if not call[1] and delta.get("id"):
                call[1] = str(delta["id"])
            if not call[2] and function.get("name"):
                call[2] = str(function["name"])
            arguments = function.get("arguments") or ""
            if not isinstance(arguments, str):  # a server that sent an object
                arguments = orjson.dumps(arguments).decode()
            if call[4]:
                if arguments:
                    out.append(ToolCallFragment(index=call[0], arguments=arguments))
                continue
            call[3] += arguments
            if call[2]:
                out.append(self._announce(call))
        return out

    def _key_without_index(self, upstream_id: object) -> object:
        """For a delta with no `index`: an id seen before continues its call, a
        new id starts one, no id continues the last call (or starts the first)."""
        if upstream_id:
            for key, call in self._calls.items():
                if call[1] == upstream_id:
                    return key
            return ("id", upstream_id)
        return self._last if self._last is not None else 0

    def close(self) -> list[ToolCallFragment]:
        """Calls the upstream never named, at the end of the stream: announced
        with what there is (the pipeline's checks see an empty name)."""
        return [self._announce(call) for call in self._calls.values() if not call[4]]

    def _announce(self, call: list[Any]) -> ToolCallFragment:
        call[4] = True
        call[1] = call[1] or new_tool_call_id()
        self.started += 1
        fragment = ToolCallFragment(index=call[0], arguments=call[3], id=call[1], name=call[2])
        call[3] = ""
        return fragment


def _message_tool_calls(calls: object) -> list[ToolCallFragment]:
    """A non-streamed message's `tool_calls`: one fragment per call."""
    if not isinstance(calls, list):
        return []
    out: list[ToolCallFragment] = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        out.append(
            ToolCallFragment(
                index=len(out),
                arguments=arguments,
                id=str(call.get("id") or new_tool_call_id()),
                name=str(function.get("name") or ""),
            )
        )
    return out


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
