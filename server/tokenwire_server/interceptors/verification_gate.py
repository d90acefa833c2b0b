"""The verification gate: nothing terminal leaves before what was sent is checked.

It wraps the response stream and sees every event. Per chunk it does O(1)
bookkeeping and keeps the chunk's text: the sequence must be the next one
and the offset must equal the bytes sent so far, otherwise the chunk is not
sent and the call fails with DATA_LOSS (the pipeline broke its own contract;
better an error the client can resume from than a wrong stream). When
`Completed` arrives, the gate hashes the streamed text and compares it with
`final_sha256` and fills `verification`: VERIFIED, or DIVERGED with the first
chunk the caller must drop. Only then does `Completed` go out, with the final
text dropped if the caller asked for that and nothing diverged.

Tool-call fragments are checked the same way per call (the index is a call
already begun or the next one; `arguments_offset` equals the bytes of that
call's earlier fragments), and at `Completed` each call's fragments, in
order, must equal its final id, name and arguments; a call that differs (or
is missing from either side) is a divergence like text, stated with the first
chunk to drop.

For unary `Respond` the payload itself is what the caller receives; its digest
must match `final_sha256`.
"""

from __future__ import annotations

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.codec import sha256_hex
from tokenwire_server.domain import utf8_length
from tokenwire_server.errors import LAST_SEQUENCE_KEY, VerificationFailed
from tokenwire_server.interceptors.call import Call, Ledger, ResponseFacts, SentToolCall
from tokenwire_server.interceptors.chain import RESPONDING, Stage


def retraction_point(chunks: list[bytes], final: bytes) -> int:
    """The first sequence whose bytes are not the final payload's at the same offset.

    `chunks` are the contiguous chunks 1..n as sent (or one tool call's
    fragments, numbered 1..n among themselves). When every one is a prefix of
    the final payload (the final text only adds to it), nothing needs
    dropping: the answer is the next sequence.
    """
    offset = 0
    for sequence, data in enumerate(chunks, start=1):
        if final[offset : offset + len(data)] != data:
            return sequence
        offset += len(data)
    return len(chunks) + 1


def _tool_calls_retraction(calls: list[SentToolCall], final: pb.Completed) -> int | None:
    """None when the calls as sent equal the final ones; else the first sequence
    to drop (one past the last chunk when what was sent is only incomplete)."""
    finals = final.tool_calls
    if len(calls) == len(finals) and all(
        sent.id == done.id and sent.name == done.name and sent.arguments == done.arguments
        for sent, done in zip(calls, finals, strict=True)
    ):
        return None
    retract = final.last_sequence + 1
    for index, sent in enumerate(calls):
        if not sent.fragments:
            continue
        if index >= len(finals) or (sent.id, sent.name) != (finals[index].id, finals[index].name):
            retract = min(retract, sent.fragments[0][0])
            continue
        # The call's fragments against its final arguments, as the text's chunks
        # against the final payload; the answer is a position among them.
        first_wrong = retraction_point(
            [text.encode() for _, text in sent.fragments], finals[index].arguments.encode()
        )
        if first_wrong <= len(sent.fragments):
            retract = min(retract, sent.fragments[first_wrong - 1][0])
    return retract


def _verify(
    completed: pb.Completed,
    streamed_sha256: str,
    retract_from: int,
    omit: bool,
    calls_retract: int | None = None,
) -> None:
    verification = completed.verification
    verification.streamed_sha256 = streamed_sha256
    if calls_retract is not None:
        verification.status = pb.VERIFICATION_STATUS_DIVERGED
        text_retract = retract_from if streamed_sha256 != completed.final_sha256 else calls_retract
        verification.retract_from_sequence = min(text_retract, calls_retract)
    elif streamed_sha256 == completed.final_sha256:
        verification.status = pb.VERIFICATION_STATUS_VERIFIED
        verification.retract_from_sequence = 0
        if omit:
            completed.final_text = ""
    else:
        verification.status = pb.VERIFICATION_STATUS_DIVERGED
        verification.retract_from_sequence = retract_from
    # Integrity: every chunk was contiguous and the digest compared (a divergence
    # is stated, not a failure); the gate refuses the call otherwise. The other
    # checks (validators) came with the response.
    verification.checks.add(name="integrity", outcome=pb.CHECK_OUTCOME_PASSED)
    # The response path said whether its validators passed (an error under
    # fail_closed is a failure there); no check may have FAILED either.
    verification.checks_passed = verification.checks_passed and not any(
        check.outcome == pb.CHECK_OUTCOME_FAILED for check in verification.checks
    )


def _describe(call: Call, completed: pb.Completed, chunks: int) -> None:
    """A divergence as an event on the call's span (where to retract, how many
    chunks were checked). A verified call says so in its `tokenwire.verification`
    attribute alone: an event costs its encoding on the loop for every call."""
    verification = completed.verification
    if verification.status != pb.VERIFICATION_STATUS_DIVERGED or not call.span.is_recording():
        return
    call.span.add_event(
        "diverged",
        {
            "tokenwire.retract_from_sequence": verification.retract_from_sequence,
            "tokenwire.chunks_checked": chunks,
        },
    )


def _contract_broken(message: str, last_sequence: int) -> VerificationFailed:
    """DATA_LOSS, naming what the caller safely holds."""
    error = VerificationFailed(message, metadata={"lastSequence": str(last_sequence)})
    error.trailers = ((LAST_SEQUENCE_KEY, str(last_sequence)),)
    return error


class VerificationGateStage(Stage):
    methods = RESPONDING

    def on_facts(self, call: Call, facts: ResponseFacts) -> None:
        """A resumed call: the caller already holds these chunks."""
        ledger = call.ledger
        for record in facts.replay_prefix:
            tool = record.tool
            if tool is None:
                ledger.texts.append(record.text)
                ledger.next_offset = record.text_offset + utf8_length(record.text)
            else:
                _sent_fragment(
                    ledger, record.sequence, tool.position, tool.id, tool.name, record.text
                )
            ledger.next_sequence = record.sequence + 1

    def on_chunk(self, call: Call, chunk: pb.TokenChunk) -> None:
        ledger = call.ledger
        if (
            ledger.completed
            or chunk.sequence != ledger.next_sequence
            or chunk.text_offset != ledger.next_offset
        ):
            raise _contract_broken(
                f"chunk {chunk.sequence}@{chunk.text_offset} does not follow "
                f"{ledger.next_sequence - 1}@{ledger.next_offset}",
                ledger.next_sequence - 1,
            )
        text = chunk.text
        if not text and chunk.HasField("tool_call"):
            self._tool_fragment(ledger, chunk)
            return
        # The texts as sent; hashed once, when Completed arrives, rather than
        # encoded and hashed chunk by chunk: one pass in C instead of two calls
        # per chunk on the hot path.
        ledger.texts.append(text)
        ledger.next_sequence += 1
        ledger.next_offset += utf8_length(text)

    @staticmethod
    def _tool_fragment(ledger: Ledger, chunk: pb.TokenChunk) -> None:
        delta = chunk.tool_call
        calls = ledger.calls
        expected = calls[delta.index].next_offset if delta.index < len(calls) else 0
        if delta.index > len(calls) or delta.arguments_offset != expected:
            raise _contract_broken(
                f"tool call {delta.index} fragment at {delta.arguments_offset} does not follow "
                f"{len(calls)} calls begun ({expected} bytes of this one)",
                ledger.next_sequence - 1,
            )
        _sent_fragment(ledger, chunk.sequence, delta.index, delta.id, delta.name, delta.arguments)
        ledger.next_sequence += 1

    async def on_completed(self, call: Call, completed: pb.Completed, unary: bool) -> None:
        if unary:
            # The payload itself is what the caller receives; it must match its digest.
            digest = sha256_hex(completed.final_text)
            if digest != completed.final_sha256:
                raise _contract_broken("the payload does not match its digest", 0)
            _verify(completed, digest, 0, omit=False)
            _describe(call, completed, 0)
            return
        ledger = call.ledger
        if ledger.completed or completed.last_sequence != ledger.next_sequence - 1:
            raise _contract_broken(
                f"Completed names last sequence {completed.last_sequence} "
                f"but {ledger.next_sequence - 1} chunks were sent",
                ledger.next_sequence - 1,
            )
        sent = ledger.texts
        streamed = sha256_hex("".join(sent))
        retract_from = 0
        if streamed != completed.final_sha256:
            retract_from = retraction_point(
                [text.encode() for text in sent], completed.final_text.encode()
            )
        calls_retract = (
            _tool_calls_retraction(ledger.calls, completed)
            if ledger.calls or completed.tool_calls
            else None
        )
        _verify(
            completed, streamed, retract_from, bool(call.request.omit_final_text), calls_retract
        )
        _describe(call, completed, ledger.next_sequence - 1)
        ledger.completed = True


def _sent_fragment(
    ledger: Ledger, sequence: int, index: int, call_id: str, name: str, arguments: str
) -> None:
    # An empty text in its place keeps `texts` indexed by sequence (for the
    # retraction point) without changing the streamed text.
    ledger.texts.append("")
    calls = ledger.calls
    if index == len(calls):
        calls.append(SentToolCall(call_id, name))
    sent = calls[index]
    sent.fragments.append((sequence, arguments))
    sent.next_offset += utf8_length(arguments)
