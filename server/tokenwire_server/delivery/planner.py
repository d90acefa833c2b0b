"""The delivery planner: decides how a response goes out and yields its events.

AUTO picks BUFFERED for answers that are short by construction (`max_tokens`
at most the configured bound) or that finished inside the buffering window,
and STREAM otherwise. STREAM cuts a chunk whenever the stream can take one,
so a fast reader gets tokens as they are released and a slow one gets them
coalesced; `max_delay` lets a caller trade latency for fewer, larger chunks.
Heartbeats fill silences longer than the configured interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.codec import EventCodec
from tokenwire_server.delivery.response import LiveResponse, State
from tokenwire_server.domain import DeliveryMode, DeliveryOptions


class StreamDelivery:
    """Turns one `LiveResponse` into the events of one `StreamRespond` call."""

    def __init__(
        self,
        response: LiveResponse,
        options: DeliveryOptions,
        codec: EventCodec,
        trace_id: str,
        start_after: int = 0,
    ) -> None:
        self._response = response
        self._options = options
        self._codec = codec
        self._trace_id = trace_id
        self._loop = asyncio.get_running_loop()
        #: Chunks up to this sequence are already held by the caller (resume).
        self._start_after = start_after
        #: Sequence of the last chunk handed to gRPC; named in the trailers on failure.
        self.last_sequence = start_after
        self._last_sent = self._loop.time()
        #: `last_sequence` when `_last_sent` was last brought up to date (see `_wait`).
        self._sequence_timed = start_after
        #: One timer per silence, not per wait: see `_wait`.
        self._heartbeat_timer: asyncio.TimerHandle | None = None

    async def events(self) -> AsyncGenerator[pb.StreamRespondResponse, None]:
        try:
            response = self._response
            mode = response.mode_used
            if mode is None:
                # A concurrent reader may choose first: choose_mode keeps the first.
                mode = response.choose_mode(await self._choose_mode())
            if mode is DeliveryMode.BUFFERED:
                async with aclosing(self._buffered()) as stream:
                    async for event in stream:
                        yield event
            else:
                async with aclosing(self._streamed()) as stream:
                    async for event in stream:
                        yield event
        finally:
            self._stop_heartbeats()
        if response.state is not State.FINISHED:
            assert response.error is not None
            raise response.error
        if response.completed_message is None:
            now = self._loop.time()
            first = response.first_chunk_at if response.first_chunk_at is not None else now
            response.completed_message = self._codec.completed(
                mode=mode,
                unary=False,
                time_to_first_token=first - response.started_at,
                total=now - response.started_at,
                trace_id=self._trace_id,
            )
        # Every reader gets the same Completed; a copy, because the gate fills it in.
        completed = pb.Completed()
        completed.CopyFrom(response.completed_message)
        yield pb.StreamRespondResponse(completed=completed)

    async def _choose_mode(self) -> DeliveryMode:
        options, response = self._options, self._response
        if options.mode is not DeliveryMode.AUTO:
            return options.mode
        if options.max_tokens <= options.auto_short_max_tokens:
            return DeliveryMode.BUFFERED
        window_end = response.started_at + options.auto_buffer_window
        while not response.done and await response.wait(window_end):
            pass
        return DeliveryMode.BUFFERED if response.state is State.FINISHED else DeliveryMode.STREAM

    async def _wait(self, until: float | None) -> pb.StreamRespondResponse | None:
        """Waits for progress (or `until`); returns a heartbeat once the silence
        reached the interval.

        The heartbeat deadline moves with every chunk, so instead of a timer per
        wait (a heap push and a cancel per chunk: thousands a second at scale)
        one timer stays armed; when it fires early because chunks went out
        meanwhile, the next wait re-arms it for the new deadline.

        Nor is the clock read per chunk: a reader waits only once it has sent
        everything there is, so when chunks went out since the previous wait,
        the last of them left just now."""
        now = self._loop.time()
        if self.last_sequence != self._sequence_timed:
            self._sequence_timed = self.last_sequence
            self._last_sent = now
        due = self._last_sent + self._options.heartbeat_interval
        if now >= due:
            self._last_sent = now
            return self._codec.heartbeat(time.time_ns())
        if self._heartbeat_timer is None:
            self._heartbeat_timer = self._loop.call_at(due, self._heartbeat_due)
        await self._response.wait(until)
        return None

    def _heartbeat_due(self) -> None:
        self._heartbeat_timer = None
        self._response.wake_readers()

    def _stop_heartbeats(self) -> None:
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None

    async def _durable(self, sequence: int) -> None:
        """With a shared log, a chunk leaves only once other replicas could replay it."""
        log = self._response.log
        if log is not None:
            await log.durable(sequence)

    def _sent(self, sequence: int) -> None:
        self.last_sequence = sequence
        if self._response.first_chunk_at is None:
            self._response.first_chunk_at = self._loop.time()

    async def _buffered(self) -> AsyncGenerator[pb.StreamRespondResponse, None]:
        response = self._response
        response.unbounded()
        self._last_sent = self._loop.time()
        while not response.done:
            if heartbeat := await self._wait(None):
                yield heartbeat
        outcome = response.outcome
        held = outcome is not None and outcome.held  # held for review: no chunk
        if response.state is State.FINISHED and not response.chunks and not held:
            response.cut_whole()  # the records are read from the log below
        for record in response.chunks[self._start_after :]:
            await self._durable(record.sequence)
            self._sent(record.sequence)
            yield self._codec.chunk(record)

    async def _streamed(self) -> AsyncGenerator[pb.StreamRespondResponse, None]:
        response, options, codec = self._response, self._options, self._codec
        chunks = response.chunks
        cap, max_delay = options.max_tokens_per_chunk, options.max_delay
        cursor = self._start_after
        self._last_sent = self._loop.time()
        while True:
            if not chunks and response.replaced:
                # Governance rewrote the answer (blocked it, say) before any chunk
                # went out: nothing needs retracting, the final payload goes out
                # whole, exactly as in BUFFERED mode.
                for record in response.cut_whole():
                    await self._durable(record.sequence)
                    self._sent(record.sequence)
                    yield codec.chunk(record)
                return
            if cursor < len(chunks):
                record = chunks[cursor]
            elif response.pending:
                if max_delay > 0 and not response.done and response.pending.tokens < cap:
                    fill_until = response.pending.since + max_delay
                    if self._loop.time() < fill_until:
                        if heartbeat := await self._wait(fill_until):
                            yield heartbeat
                        continue
                record = response.cut_chunk(cap)
            elif response.done:
                return
            else:
                if heartbeat := await self._wait(None):
                    yield heartbeat
                continue
            cursor += 1
            if response.log is not None:
                await response.log.durable(record.sequence)
            self._sent(record.sequence)
            yield codec.chunk(record)
