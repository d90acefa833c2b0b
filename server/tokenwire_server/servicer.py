"""RespondService: thin typed methods mapping requests onto the pipeline and back.

Each call validates its request, starts one generation task feeding a
`LiveResponse`, and either waits for the end (unary) or hands the response to
the delivery planner (stream). The generation task is tied to the call: when
the call ends for any reason (the caller cancels or disconnects, its deadline
passes, the server stops), the task is cancelled, which stops the backend.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import respond_pb2_grpc
from tokenwire_server.audit.records import CALL_RECORD, CallRecord
from tokenwire_server.backends.registry import BackendRegistry
from tokenwire_server.call_context import CALL_DEADLINE, CALL_IDENTITY, CallIdentity
from tokenwire_server.codec import EventCodec
from tokenwire_server.config import Config
from tokenwire_server.delivery.generation import run_generation
from tokenwire_server.delivery.planner import StreamDelivery
from tokenwire_server.delivery.response import LiveResponse, State
from tokenwire_server.domain import DeliveryMode
from tokenwire_server.errors import (
    COMPLETION_TOKENS_KEY,
    LAST_SEQUENCE_KEY,
    PROMPT_TOKENS_KEY,
    InternalError,
    TokenwireError,
    abort,
)
from tokenwire_server.governance.holder import PolicyHolder
from tokenwire_server.interceptors.request_context import current_trace_id
from tokenwire_server.tokens import estimate_prompt_tokens
from tokenwire_server.validation import ParsedCall, parse_call

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


def new_response_id() -> str:
    return f"rsp_{uuid.uuid4().hex}"


class RespondServicer(respond_pb2_grpc.RespondServiceServicer):
    def __init__(
        self,
        config: Config,
        registry: BackendRegistry,
        policies: PolicyHolder,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._policies = policies
        self._tracer = tracer or trace.get_tracer(__name__)

    def _start(
        self, request: pb.RespondRequest | pb.StreamRespondRequest, context: Context
    ) -> tuple[ParsedCall, LiveResponse, CallIdentity]:
        loop = asyncio.get_running_loop()
        identity = CALL_IDENTITY.get() or CallIdentity(
            request_id=request.request_id or f"req_{uuid.uuid4().hex}",
            trace_id=current_trace_id(),
        )
        deadline = CALL_DEADLINE.get()
        if deadline is None:
            deadline = loop.time() + self._config.deadlines.default_deadline
        call = parse_call(request, self._config, self._registry, deadline)
        policy = self._policies.current  # kept for the whole response, whatever reloads
        response = LiveResponse(
            response_id=new_response_id(),
            request_id=identity.request_id,
            model=call.model,
            policy_id=policy.policy_id,
            policy_version=policy.policy_version,
            max_pending_chars=self._config.delivery.max_pending_chars,
        )
        record = CALL_RECORD.get() or CallRecord()
        record.response_id = response.response_id
        record.model, record.model_version = call.model.name, call.model.version
        record.backend = call.model.backend
        record.policy_id, record.policy_version = policy.policy_id, policy.policy_version
        record.token_events = bool(getattr(policy, "token_events", False))
        if call.delivery is None:
            response.unbounded()  # unary: nothing streams, so nothing may wait for a reader
        task = asyncio.create_task(
            run_generation(
                call.backend,
                call.generation,
                policy.open_session(),
                response,
                self._config.deadlines.stall_timeout,
                self._tracer,
            ),
            name=f"generate {response.response_id}",
        )
        response.task = task
        context.add_done_callback(lambda _: response.stop_generation())  # type: ignore[arg-type]
        return call, response, identity

    async def Respond(self, request: pb.RespondRequest, context: Context) -> pb.RespondResponse:
        try:
            call, response, identity = self._start(request, context)
        except TokenwireError as error:
            await abort(context, error)
            raise  # unreachable: abort raises
        await response.wait_ended()
        if response.state is not State.FINISHED:
            await self._fail(context, response, call, 0)
        loop = asyncio.get_running_loop()
        now = loop.time()
        first = response.first_token_at if response.first_token_at is not None else now
        completed = EventCodec(response).completed(
            mode=DeliveryMode.BUFFERED,
            unary=True,
            time_to_first_token=first - response.started_at,
            total=now - response.started_at,
            trace_id=identity.trace_id,
        )
        return pb.RespondResponse(completed=completed)

    async def StreamRespond(
        self, request: pb.StreamRespondRequest, context: Context
    ) -> AsyncIterator[pb.StreamRespondResponse]:
        try:
            call, response, identity = self._start(request, context)
        except TokenwireError as error:
            await abort(context, error)
            return
        assert call.delivery is not None
        delivery = StreamDelivery(response, call.delivery, EventCodec(response), identity.trace_id)
        try:
            async for event in delivery.events():
                yield event
        except TokenwireError:
            await self._fail(context, response, call, delivery.last_sequence)
        finally:
            response.stop_generation()
            _note_progress(response, call, delivery.last_sequence)

    async def _fail(
        self, context: Context, response: LiveResponse, call: ParsedCall, last_sequence: int
    ) -> None:
        """Ends a call whose response failed: status, details and partial usage."""
        error = response.error or InternalError("the response ended without a result")
        _note_progress(response, call, last_sequence, error.reason)
        error.metadata["lastSequence"] = str(last_sequence)
        error.metadata["responseId"] = response.response_id
        log.warning(
            "response %s failed after sequence %d: %s %s",
            response.response_id,
            last_sequence,
            error.reason,
            error.message,
        )
        await abort(
            context,
            error,
            (
                (LAST_SEQUENCE_KEY, str(last_sequence)),
                (PROMPT_TOKENS_KEY, str(estimate_prompt_tokens(call.generation.messages))),
                (COMPLETION_TOKENS_KEY, str(response.tokens_generated)),
            ),
        )


def _note_progress(
    response: LiveResponse, call: ParsedCall, last_sequence: int, error_reason: str = ""
) -> None:
    """Tells the audit record how far a call got, for calls that end without Completed."""
    record = CALL_RECORD.get()
    if record is None:
        return
    record.last_sequence = last_sequence
    record.completion_tokens = response.tokens_generated
    record.prompt_tokens = estimate_prompt_tokens(call.generation.messages)
    if error_reason:
        record.error_reason = error_reason
