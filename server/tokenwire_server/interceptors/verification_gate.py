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

For unary `Respond` the payload itself is what the caller receives; its digest
must match `final_sha256`.
"""

from __future__ import annotations

from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.codec import sha256_hex
from tokenwire_server.domain import utf8_length
from tokenwire_server.errors import LAST_SEQUENCE_KEY, VerificationFailed
from tokenwire_server.interceptors.call import Call, ResponseFacts
from tokenwire_server.interceptors.chain import RESPONDING, Stage


def retraction_point(chunks: list[bytes], final: bytes) -> int:
    """The first sequence whose bytes are not the final payload's at the same offset.

    `chunks` are the contiguous chunks 1..n as sent. When every one is a prefix
    of the final payload (the final text only adds to it), nothing needs
    dropping: the answer is the next sequence.
    """
    offset = 0
    for sequence, data in enumerate(chunks, start=1):
        if final[offset : offset + len(data)] != data:
            return sequence
        offset += len(data)
    return len(chunks) + 1


def _verify(completed: pb.Completed, streamed_sha256: str, retract_from: int, omit: bool) -> None:
    verification = completed.verification
    verification.streamed_sha256 = streamed_sha256
    if streamed_sha256 == completed.final_sha256:
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
    """The gate's verdict as an event on the call's span: an event, not a child
    span, because every span is encoded and exported under the GIL, and four
    spans per call showed in the p99 time to first token."""
    if not call.span.is_recording():
        return
    verification = completed.verification
    call.span.add_event(
        "verify",
        {
            "tokenwire.verification": pb.VerificationStatus.Name(verification.status),
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
        for sequence, offset, data in facts.replay_prefix:
            ledger.texts.append(data.decode())
            ledger.next_sequence, ledger.next_offset = sequence + 1, offset + len(data)

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
        # The texts as sent; hashed once, when Completed arrives, rather than
        # encoded and hashed chunk by chunk: one pass in C instead of two calls
        # per chunk on the hot path.
        ledger.texts.append(text)
        ledger.next_sequence += 1
        ledger.next_offset += utf8_length(text)

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
        _verify(completed, streamed, retract_from, bool(call.request.omit_final_text))
        _describe(call, completed, len(sent))
        ledger.completed = True
