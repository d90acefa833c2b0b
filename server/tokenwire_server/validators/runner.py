"""Runs the validators of one response, concurrently with generation and with each other.

Per response the response path does three things (nothing when no validator
matches: `Validators.start` returns None):

1. `run = validators.start(facts)` when the response starts. Stream-mode
   validators open their `ValidateStream` call at once, so connection and
   start message cost nothing later. `run.gates_release` says whether a
   matched validator is a release gate (release no text before `finish`).
2. `run.feed(text)` with each piece of released text. It never awaits and
   never blocks: the text is appended to each stream validator's pending
   window and its sender task writes it when the window is full (windows
   coalesce while a validator reads slowly; past `MAX_BACKLOG_CHARS` behind,
   the validator counts as errored). `run.halted` turns true as soon as a
   stream validator FAILs (or errors under fail_closed): release nothing more.
3. `result = await run.finish(final_text)` before `Completed`: every
   validator gives its verdict within its own timeout, all at once; one that
   is down, crashes, hangs or answers garbage is mapped through its
   `on_error`, never raised. `run.cancel()` instead when the response fails.

`ValidationResult` holds one `VerificationCheck` per validator
(`validator:<name>`, outcome, violations, latency) and what the verdicts mean
for the final payload (`resolve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Mapping, Sequence

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire_server.validators.calls import StreamCheck, UnaryCheck
from tokenwire_server.validators.channels import ChannelPool
from tokenwire_server.validators.config import Mode, ValidatorConfig, matching
from tokenwire_server.validators.results import (
    NO_VALIDATORS,
    FinalPayload,
    Outcome,
    ResponseFacts,
    ValidationResult,
    ValidatorVerdict,
)
from tokenwire_server.validators.verdicts import CheckHook

__all__ = [
    "NO_VALIDATORS",
    "CheckHook",
    "FinalPayload",
    "Outcome",
    "ResponseFacts",
    "ValidationResult",
    "ValidationRun",
    "ValidatorVerdict",
    "Validators",
]


class ValidationRun:
    """The validators of one response (see the module docstring for its use)."""

    def __init__(
        self,
        validators: Validators,
        configs: tuple[ValidatorConfig, ...],
        facts: ResponseFacts,
        on_check: CheckHook | None,
    ) -> None:
        self.facts = facts
        self.configs = configs
        #: A matched validator is a release gate: release no text before `finish`.
        self.gates_release = any(c.release_gate for c in configs)
        #: A stream validator failed: release nothing more (generation may stop).
        self.halted = False
        #: With `halted`: the UTF-8 offset of released text the failure starts at.
        self.halt_offset: int | None = None
        self._validators = validators
        self._on_check = on_check
        self._pool = validators.pool
        self._finished = False
        self._digest = hashlib.sha256()
        self._checks: list[UnaryCheck | StreamCheck] = []
        for config in configs:
            channel = self._pool.acquire(config)
            if config.mode is Mode.STREAM:
                self._checks.append(StreamCheck(self._halt, config, channel, facts, on_check))
            else:
                self._checks.append(UnaryCheck(config, channel, on_check))
        self._streams = [c for c in self._checks if isinstance(c, StreamCheck)]

    def feed(self, released_text: str) -> None:
        """Released text, in release order. Never awaits; cheap without stream validators."""
        if not self._streams or not released_text:
            return
        self._digest.update(released_text.encode())
        for check in self._streams:
            check.feed(released_text)

    def _halt(self, verdict: ValidatorVerdict) -> None:
        self.halted = True
        offset = verdict.cut_offset if verdict.cut_offset is not None else 0
        self.halt_offset = offset if self.halt_offset is None else min(self.halt_offset, offset)

    async def finish(
        self, final_text: str, tool_calls: Sequence[pb.ToolCall] = ()
    ) -> ValidationResult:
        """Every verdict, each within its timeout; never raises for a validator's failure."""
        if self._finished:
            raise RuntimeError("finish() was already called for this response")
        self._finished = True
        end = vpb.TextEnd(final_sha256=hashlib.sha256(final_text.encode()).hexdigest())
        if self._streams:
            end.diverged = end.final_sha256 != self._digest.hexdigest()
            if end.diverged:
                end.final_text = final_text
        end.tool_calls.extend(tool_calls)
        try:
            verdicts = await asyncio.gather(
                *(
                    check.finish(end, self.facts)
                    if isinstance(check, StreamCheck)
                    else check.run(self.facts, final_text, tool_calls)
                    for check in self._checks
                )
            )
        finally:
            await self._release()
        return ValidationResult(tuple(verdicts))

    def cancel(self) -> None:
        """The response failed or was cancelled: stop every validator call now."""
        if self._finished:
            return
        self._finished = True
        task = asyncio.get_running_loop().create_task(self._release())
        self._validators.keep(task)

    async def _release(self) -> None:
        for check in self._streams:
            await check.close()
        for config in self.configs:
            self._pool.release(config)
        await self._pool.collect()


class Validators:
    """The configured validators and their channels; one per server."""

    def __init__(
        self, configs: Sequence[ValidatorConfig] = (), on_check: CheckHook | None = None
    ) -> None:
        self.configs: tuple[ValidatorConfig, ...] = tuple(configs)
        self.pool = ChannelPool()
        self._on_check = on_check
        self._tasks: set[asyncio.Task[None]] = set()

    def configure(self, configs: Sequence[ValidatorConfig]) -> None:
        """A reload: new responses use `configs`; running ones keep theirs."""
        self.configs = tuple(configs)
        self.pool.retain(self.configs)

    def matching(
        self, model: str, tenant: str, labels: Mapping[str, str]
    ) -> tuple[ValidatorConfig, ...]:
        return matching(self.configs, model, tenant, labels)

    def start(self, facts: ResponseFacts) -> ValidationRun | None:
        """The run for one response, or None when no validator applies to it.
        Call it inside the event loop, when the response starts."""
        configs = self.matching(facts.model, facts.tenant, facts.labels)
        if not configs:
            return None
        return ValidationRun(self, configs, facts, self._on_check)

    def keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.pool.aclose()
