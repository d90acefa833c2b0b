"""Builds wire messages from domain state, in one place.

Per chunk the hot path builds exactly one `StreamRespondResponse`: the parts
that are the same for every chunk of a response (its id, the governance
block) are built once as a template and copied.
"""

from __future__ import annotations

import hashlib

from google.protobuf import duration_pb2, timestamp_pb2

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.delivery.chunks import ChunkRecord
from tokenwire_server.delivery.response import LiveResponse, Outcome
from tokenwire_server.domain import Action, DeliveryMode


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _duration(seconds: float) -> duration_pb2.Duration:
    nanos = max(0, int(seconds * 1e9))
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _review(outcome: Outcome) -> pb.ReviewRef | None:
    if outcome.review is None:
        return None
    review_id, state = outcome.review
    return pb.ReviewRef(
        review_id=review_id,
        state=pb.ReviewState.Value(f"REVIEW_STATE_{state}"),  # type: ignore[arg-type]
        held=outcome.held,
    )


def action_message(action: Action) -> pb.GovernanceAction:
    return pb.GovernanceAction(
        rule_id=action.rule_id,
        entity_type=action.entity_type,
        operator=int(action.operator),  # type: ignore[arg-type]
        start=action.start,
        end=action.end,
    )


class EventCodec:
    """Message factory for one response."""

    def __init__(self, response: LiveResponse) -> None:
        self._response = response
        self._response_id = response.response_id
        self._chunk_template = pb.StreamRespondResponse(
            chunk=pb.TokenChunk(
                response_id=response.response_id,
                governance=pb.Governance(
                    policy_id=response.policy_id,
                    policy_version=response.policy_version,
                    model=response.model.name,
                    model_version=response.model.version,
                ),
            )
        )

    def chunk(self, record: ChunkRecord) -> pb.StreamRespondResponse:
        # Copying a prebuilt template and setting scalars costs about half of
        # building the nested messages from keyword arguments.
        event = pb.StreamRespondResponse()
        event.CopyFrom(self._chunk_template)
        chunk = event.chunk
        chunk.sequence = record.sequence
        tool = record.tool
        if tool is None:
            chunk.text = record.text
        else:
            delta = chunk.tool_call
            delta.index = tool.position
            delta.id = tool.id
            delta.name = tool.name
            delta.arguments = record.text
            delta.arguments_offset = tool.arguments_offset
        chunk.text_offset = record.text_offset
        chunk.token_count = record.token_count
        if record.actions:
            chunk.governance.actions.extend(action_message(a) for a in record.actions)
        ns = record.emitted_at_ns
        emitted_at = chunk.emitted_at
        emitted_at.seconds = ns // 1_000_000_000
        emitted_at.nanos = ns % 1_000_000_000
        return event

    def heartbeat(self, now_ns: int) -> pb.StreamRespondResponse:
        return pb.StreamRespondResponse(
            heartbeat=pb.Heartbeat(response_id=self._response_id, emitted_at=_timestamp(now_ns))
        )

    def completed(
        self,
        *,
        mode: DeliveryMode,
        unary: bool,
        time_to_first_token: float,
        total: float,
        trace_id: str,
    ) -> pb.Completed:
        """The terminal message; `verification` is left to the verification gate."""
        response = self._response
        outcome: Outcome | None = response.outcome
        assert outcome is not None
        last = response.chunks[-1].sequence if response.chunks and not unary else 0
        return pb.Completed(
            response_id=response.response_id,
            request_id=response.request_id,
            final_text=outcome.final_text,
            final_sha256=sha256_hex(outcome.final_text),
            chunk_count=last,
            last_sequence=last,
            finish_reason=int(outcome.finish_reason),  # type: ignore[arg-type]
            usage=pb.Usage(
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
            ),
            verdict=int(outcome.verdict),  # type: ignore[arg-type]
            review_required=outcome.review_required,
            timing=pb.Timing(
                time_to_first_token=_duration(time_to_first_token), total=_duration(total)
            ),
            model=response.model.name,
            model_version=response.model.version,
            policy_id=response.policy_id,
            policy_version=response.policy_version,
            trace_id=trace_id,
            delivery_mode=int(mode),  # type: ignore[arg-type]
            serving=pb.Serving(
                backend=outcome.backend,
                path=int(outcome.path),  # type: ignore[arg-type]
                attempts=outcome.attempts,
            ),
            actions=[action_message(a) for a in outcome.actions],
            verification=pb.Verification(
                checks=outcome.checks, checks_passed=outcome.checks_passed
            ),
            review=_review(outcome),
            tool_calls=[
                pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)
                for call in outcome.tool_calls
            ],
        )
