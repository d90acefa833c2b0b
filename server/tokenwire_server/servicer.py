"""RespondService: thin typed methods mapping requests onto the pipeline and back.

A new request is validated, registered in the response store (a retried
request id attaches to the response it started instead of generating
again: the one rule is in docs/operations.md, "Idempotency"), and fed by
one generation task. A response that nothing can attach to or resume, from
a backend that waits on the network, starts generating first: its upstream
request leaves while it is registered and recorded. Every call that reads
a response holds a `Reader`; when the last reader goes away, a resumable
response keeps generating for the detach window (its chunks go to the log),
any other is cancelled, which stops the backend. `resume` replays the log
after the caller's sequence and continues live; `Cancel` stops a response
by id.

Why one module: these are the three RPCs and the two ways a response starts
(new or resumed) and ends (Completed or a status), each short; together they
are the contract's mapping in one place.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.backends.registry import BackendRegistry
from tokenwire_server.codec import EventCodec
from tokenwire_server.config import Config
from tokenwire_server.delivery.generation import run_generation
from tokenwire_server.delivery.planner import StreamDelivery
from tokenwire_server.delivery.response import LiveResponse, State
from tokenwire_server.delivery.validation_path import ValidationPath
from tokenwire_server.domain import DeliveryMode, DeliveryOptions, GenerationRequest
from tokenwire_server.errors import (
    COMPLETION_TOKENS_KEY,
    LAST_SEQUENCE_KEY,
    PROMPT_TOKENS_KEY,
    FieldViolation,
    InternalError,
    InvalidRequest,
    RequestIdReused,
    ResponseNotFound,
    SequenceOutOfRange,
    TokenwireError,
)
from tokenwire_server.governance.holder import PolicyHolder
from tokenwire_server.governance.policy import GovernanceSession, Policy
from tokenwire_server.governance.replay import ReplayingSession
from tokenwire_server.interceptors.call import Call, Progress, ResponseFacts
from tokenwire_server.review.desk import ReviewDesk
from tokenwire_server.store.base import ResponseStore
from tokenwire_server.structured.json_governance import JsonGovernanceSession
from tokenwire_server.tokens import estimate_prompt_tokens
from tokenwire_server.validation import ParsedCall, parse_call
from tokenwire_server.validators.runner import ResponseFacts as ValidatorFacts
from tokenwire_server.validators.runner import Validators

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
Request = pb.RespondRequest | pb.StreamRespondRequest


def new_response_id() -> str:
    return f"rsp_{uuid.uuid4().hex}"


def fingerprint(request: Request) -> str:
    """What makes two requests "the same" for idempotency: the RPC and everything in
    the body but ids and resume (so one id names one request, whichever RPC)."""
    copy = type(request).FromString(request.SerializeToString())
    copy.ClearField("request_id")
    if isinstance(copy, pb.StreamRespondRequest):
        copy.ClearField("resume")
    digest = hashlib.sha256(copy.DESCRIPTOR.full_name.encode() + b"\0")
    digest.update(copy.SerializeToString(deterministic=True))
    return digest.hexdigest()


def idempotency_key(tenant: str, request_id: str) -> str:
    """One key space per tenant for both RPCs; the length prefix keeps a tenant
    containing ':' from ever meeting another tenant's key."""
    return f"{len(tenant)}:{tenant}:{request_id}"


class RespondServicer:
    """`respond`, `stream_respond` and `cancel` take the chain's `Call` (wire.py)."""

    def __init__(
        self,
        config: Config,
        registry: BackendRegistry,
        policies: PolicyHolder,
        store: ResponseStore,
        validators: Validators | None = None,
        reviews: ReviewDesk | None = None,
    ) -> None:
        self._validators = validators
        self._reviews = reviews
        self._config = config
        self._registry = registry
        self._policies = policies
        self._store = store

    async def adopt_orphans(self) -> None:
        """Runs for the server's life: asks the store for responses whose replica
        died and that this replica now owns, and continues each one it can."""
        while True:
            orphan = await self._store.next_orphan()
            continued = False
            try:
                continued = await self._take_over(orphan.response, orphan.request)
            finally:
                await self._store.settle_orphan(orphan, continued)

    async def _take_over(self, response: LiveResponse, request_bytes: bytes) -> bool:
        """Continues a response whose replica died: only exactly, or not at all."""
        if response.delivery is None:
            return False
        request = pb.StreamRespondRequest.FromString(request_bytes)
        deadline = asyncio.get_running_loop().time() + self._config.deadlines.default_deadline
        try:
            call = parse_call(request, self._config, self._registry, deadline)
        except TokenwireError:
            return False
        policy = self._policies.current
        if not call.backend.deterministic or (policy.policy_id, policy.policy_version) != (
            response.policy_id,
            response.policy_version,
        ):
            return False
        if call.generation.tools or any(c.tool is not None for c in response.chunks):
            # Replaying governance skips the logged text; a tool call's governed
            # arguments cannot be re-derived that way, so such a response is not
            # continued (its readers fail and resume from what they hold).
            return False
        logged = b"".join(c.text.encode() for c in response.chunks)
        response.on_end(self._store.finished)
        response.task = asyncio.create_task(
            run_generation(
                call.backend,
                call.generation,
                ReplayingSession(_text_session(policy, call.generation), logged),
                response,
                self._config.deadlines.stall_timeout,
                functools.partial(JsonGovernanceSession, policy),
            ),
            name=f"continue {response.response_id}",
        )
        return True

    async def _start(self, request: Request, call: Call) -> LiveResponse:
        """The response this request reads: a new one, or the one its request id started."""
        deadline = call.deadline
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._config.deadlines.default_deadline
        parsed = parse_call(request, self._config, self._registry, deadline)
        policy = self._policies.current  # kept for the whole response, whatever reloads
        response = LiveResponse(
            response_id=new_response_id(),
            request_id=call.request_id or request.request_id or f"req_{uuid.uuid4().hex}",
            model=parsed.model,
            policy_id=policy.policy_id,
            policy_version=policy.policy_version,
            max_pending_chars=self._config.delivery.max_pending_chars,
        )
        response.delivery = parsed.delivery
        if isinstance(request, pb.StreamRespondRequest):
            response.resumable = request.resumable or self._config.resume.resumable_by_default
            response.detach_window = self._config.resume.detach_window
        if parsed.delivery is None:
            response.unbounded()  # unary: nothing streams, so nothing may wait for a reader
        else:
            response.detached_chunk_tokens = parsed.delivery.max_tokens_per_chunk
            if parsed.delivery.mode is DeliveryMode.BUFFERED:
                response.choose_mode(DeliveryMode.BUFFERED)
        response.tenant = call.tenant
        # Only a caller's own request id (the field, else the x-request-id header) makes
        # a retry attach; generated ids never repeat. Keys are per tenant: one tenant's
        # ids never reach another's responses.
        caller_id = call.caller_request_id
        key = idempotency_key(response.tenant, caller_id) if caller_id else None
        if key is None and not response.resumable and parsed.backend.waits_on_network:
            # Nothing can attach to a response without the caller's id, and
            # nothing resumes it, so no store needs it before it runs: its
            # upstream request leaves first, and the registration and records
            # run while it is out. Two yields: the generation task's first step
            # hands the request to aiohttp, whose body writer is a task of its
            # own before Python 3.12.
            self._generate(request, parsed, policy, response, deadline)
            try:
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                await self._store.register(response, None, "", request.SerializeToString)
                if response.done:  # it failed (a deadline already past) before it was registered
                    self._store.finished(response)
                else:
                    response.on_end(self._store.finished)
                self._report(call, parsed, policy, response)
            except BaseException:
                response.stop_generation()  # nobody will read it
                raise
            return response
        try:
            attached = await self._store.register(
                response,
                key,
                fingerprint(request) if key is not None else "",  # only a key is ever compared
                request.SerializeToString,
            )
        except RequestIdReused as reused:
            raise RequestIdReused(
                f"request id {caller_id!r} was already used for a different request",
                metadata={"requestId": caller_id, **reused.metadata},
            ) from None
        response = attached.response
        self._report(call, parsed, policy, response)
        if attached.existing:
            return response
        response.on_end(self._store.finished)
        self._generate(request, parsed, policy, response, deadline)
        return response

    def _report(
        self, call: Call, parsed: ParsedCall, policy: Policy, response: LiveResponse
    ) -> None:
        call.report(
            ResponseFacts(
                response_id=response.response_id,
                model=parsed.model.name,
                model_version=parsed.model.version,
                backend=parsed.model.backend,
                policy_id=response.policy_id,
                policy_version=response.policy_version,
                prompt_tokens=estimate_prompt_tokens(parsed.generation.messages),
                token_events=bool(getattr(policy, "token_events", False)),
            )
        )

    def _generate(
        self,
        request: Request,
        parsed: ParsedCall,
        policy: Policy,
        response: LiveResponse,
        deadline: float,
    ) -> None:
        """Starts the task that feeds `response`; it runs once the caller yields."""
        response.validation = self._validation_path(request, parsed, policy, response, deadline)
        if response.validation is not None and response.validation.withholds:
            # Nothing may leave before the validators and escalation rules decide.
            response.choose_mode(DeliveryMode.BUFFERED)
            response.unbounded()
        response.task = asyncio.create_task(
            run_generation(
                parsed.backend,
                parsed.generation,
                _text_session(policy, parsed.generation),
                response,
                self._config.deadlines.stall_timeout,
                functools.partial(JsonGovernanceSession, policy),
            ),
            name=f"generate {response.response_id}",
        )

    def _validation_path(
        self,
        request: Request,
        parsed: ParsedCall,
        policy: Policy,
        response: LiveResponse,
        deadline: float,
    ) -> ValidationPath | None:
        """The response's validators and escalation rules; None when none apply."""
        labels = dict(request.labels)
        model = parsed.model.name
        run = None
        if self._validators is not None:
            run = self._validators.start(
                ValidatorFacts(
                    response_id=response.response_id,
                    model=model,
                    tenant=response.tenant,
                    labels=labels,
                    model_version=parsed.model.version,
                    policy_id=response.policy_id,
                    policy_version=response.policy_version,
                    messages=parsed.generation.messages,
                    deadline=deadline,
                )
            )
        rules = policy.escalation
        if run is None and not rules.rules:
            return None
        return ValidationPath(
            run=run,
            rules=rules,
            desk=self._reviews,
            tenant=response.tenant,
            labels=labels,
            request_id=response.request_id,
            may_hold=rules.may_hold(
                model, response.tenant, labels, (tool.name for tool in parsed.generation.tools)
            ),
        )

    async def _resume(self, request: pb.StreamRespondRequest, call: Call) -> LiveResponse:
        resume = request.resume
        if not resume.response_id:
            raise InvalidRequest(
                "resume needs a response_id",
                reason="INVALID_RESUME",
                violations=[FieldViolation("resume.response_id", "must not be empty")],
            )
        response = await self._store.get(resume.response_id)
        if response is not None and response.tenant != call.tenant:
            response = None  # someone else's: indistinguishable from unknown
        if response is None:
            raise ResponseNotFound(
                f"response {resume.response_id} is unknown or expired",
                metadata={"responseId": resume.response_id},
            )
        if resume.after_sequence > len(response.chunks):
            raise SequenceOutOfRange(
                f"after_sequence {resume.after_sequence} is beyond the last sequence "
                f"{len(response.chunks)}",
                metadata={
                    "responseId": response.response_id,
                    "lastSequence": str(len(response.chunks)),
                },
            )
        call.report(
            ResponseFacts(
                response_id=response.response_id,
                model=response.model.name,
                model_version=response.model.version,
                backend=response.model.backend,
                policy_id=response.policy_id,
                policy_version=response.policy_version,
                replay_prefix=tuple(response.chunks[: resume.after_sequence]),
            )
        )
        return response

    async def respond(
        self, request: pb.RespondRequest, context: Context, call: Call
    ) -> pb.RespondResponse:
        response = await self._start(request, call)
        reader = response.attach()
        context.add_done_callback(lambda _: reader.release())  # type: ignore[arg-type]
        try:
            await response.wait_ended()
        finally:
            reader.release()
        if response.state is not State.FINISHED:
            raise self._failure(call, response, 0)
        now = asyncio.get_running_loop().time()
        first = response.first_token_at if response.first_token_at is not None else now
        completed = EventCodec(response).completed(
            mode=DeliveryMode.BUFFERED,
            unary=True,
            time_to_first_token=first - response.started_at,
            total=now - response.started_at,
            trace_id=call.trace_id,
        )
        return pb.RespondResponse(completed=completed)

    async def stream_respond(
        self, request: pb.StreamRespondRequest, context: Context, call: Call
    ) -> AsyncGenerator[pb.StreamRespondResponse, None]:
        if request.HasField("resume"):
            response = await self._resume(request, call)
            start_after = request.resume.after_sequence
        else:
            response = await self._start(request, call)
            start_after = 0
        options: DeliveryOptions | None = response.delivery
        if options is None:  # a unary response cannot be streamed
            raise ResponseNotFound(
                f"response {response.response_id} is not a stream",
                metadata={"responseId": response.response_id},
            )
        reader = response.attach()
        context.add_done_callback(lambda _: reader.release())  # type: ignore[arg-type]
        codec = EventCodec(response)
        delivery = StreamDelivery(response, options, codec, call.trace_id, start_after)
        try:
            async with aclosing(delivery.events()) as stream:
                async for event in stream:
                    yield event
        except TokenwireError as error:
            raise self._failure(call, response, delivery.last_sequence, error) from None
        finally:
            reader.release()
            if call.progress.last_sequence < delivery.last_sequence:
                call.report(Progress(delivery.last_sequence, response.tokens_generated))

    async def cancel(
        self, request: pb.CancelRequest, context: Context, call: Call
    ) -> pb.CancelResponse:
        response = await self._store.get(request.response_id) if request.response_id else None
        if response is not None and response.tenant != call.tenant:
            response = None  # someone else's: indistinguishable from unknown
        if response is None:
            raise ResponseNotFound(
                f"response {request.response_id!r} is unknown or expired",
                metadata={"responseId": request.response_id},
            )
        was_running = not response.done
        if was_running:
            await self._store.request_cancel(response)
            await response.wait_ended()
        return pb.CancelResponse(
            response_id=response.response_id,
            last_sequence=len(response.chunks),
            was_running=was_running and response.state is State.CANCELLED,
        )

    def _failure(
        self,
        call: Call,
        response: LiveResponse,
        last_sequence: int,
        cause: TokenwireError | None = None,
    ) -> TokenwireError:
        """The error a call whose response failed ends with: its status, details,
        the last sequence the caller holds and the partial usage. `cause` is
        what ended this call's delivery when the response itself did not fail
        (a shared log that stopped taking chunks after generation finished)."""
        error = response.error or cause or InternalError("the response ended without a result")
        metadata = {
            **error.metadata,
            "lastSequence": str(last_sequence),
            "responseId": response.response_id,
        }
        original = error
        error = type(original)(
            original.message,
            reason=original.reason,
            metadata=metadata,
            violations=original.violations,
            retry_after=original.retry_after,
            quota=original.quota,
        )
        error.code = original.code  # an error replayed from a shared log keeps its status
        call.report(Progress(last_sequence, response.tokens_generated, error.reason))
        log.info(
            "response %s ended after sequence %d: %s %s",
            response.response_id,
            last_sequence,
            error.reason,
            error.message,
        )
        facts = call.facts
        error.trailers = (
            (LAST_SEQUENCE_KEY, str(last_sequence)),
            (PROMPT_TOKENS_KEY, str(facts.prompt_tokens if facts is not None else 0)),
            (COMPLETION_TOKENS_KEY, str(response.tokens_generated)),
        )
        return error


def _text_session(policy: Policy, request: GenerationRequest) -> GovernanceSession:
    """JSON text (a JSON `response_format`) is governed as JSON: string contents
    are redacted and the output stays JSON; anything else as text."""
    fmt = request.response_format
    if fmt is not None and fmt.is_json:
        return JsonGovernanceSession(policy)
    return policy.open_session()
