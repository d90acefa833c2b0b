"""A compliance validator for tokenwire, in Python: tokenwire.v1.ValidatorService.

- FAIL on forbidden claims ("guaranteed returns", "risk-free", "can't lose"...):
  such text must never reach a customer.
- ESCALATE numbers that look like financial advice ("buy 100 shares",
  "invest $5,000", "a 12% annual return"): a person should look first.
- PASS anything else.

Both modes are served: `Validate` judges the final payload; `ValidateStream`
judges released text window by window, fails as soon as a forbidden claim
appears (naming the window it starts in, so tokenwire retracts from there)
and gives its verdict on the rest at the end.

    pip install ./clients/python        # the generated stubs (package tokenwire)
    python examples/validators/python/compliance_validator.py --port 7070
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from tokenwire.v1 import respond_pb2 as pb
from tokenwire.v1 import validator_pb2 as vpb
from tokenwire.v1 import validator_pb2_grpc as vgrpc

#: Claims no answer may make.
FORBIDDEN = re.compile(
    r"(?i)\b(guaranteed\s+(?:returns?|profits?|gains?|income)|risk[-\s]free|"
    r"(?:can(?:no|')t|cannot)\s+lose|no\s+risk\s+(?:at\s+all|whatsoever))\b"
)
#: Amounts, percentages or share counts tied to an investing verb or a yield.
ADVICE = re.compile(
    r"(?i)\b(?:buy|sell|invest|put|allocate|move)\b[^.\n]{0,40}?"
    r"(?:\$\s?\d[\d,]*(?:\.\d+)?|\d+(?:\.\d+)?\s?%|\d[\d,]*\s+shares?)"
    r"|\b\d+(?:\.\d+)?\s?%\s+(?:annual\s+|yearly\s+|monthly\s+)?(?:returns?|yields?|gains?)\b"
)


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    start: int  # UTF-8 bytes
    end: int


def _spans(pattern: re.Pattern[str], text: str, code: str, message: str) -> list[Finding]:
    found = []
    for match in pattern.finditer(text):
        start = len(text[: match.start()].encode())
        found.append(Finding(code, message, start, start + len(match.group().encode())))
    return found


def forbidden_claims(text: str) -> list[Finding]:
    return _spans(FORBIDDEN, text, "FORBIDDEN_CLAIM", "a claim no answer may make")


def numeric_advice(text: str) -> list[Finding]:
    return _spans(ADVICE, text, "NUMERIC_ADVICE", "numbers that look like financial advice")


def _violations(findings: list[Finding]) -> list[pb.CheckViolation]:
    return [
        pb.CheckViolation(code=f.code, message=f.message, start=f.start, end=f.end)
        for f in findings
    ]


def judge(text: str) -> vpb.ValidateResponse:
    """The verdict on a whole text: FAIL beats ESCALATE beats PASS."""
    if claims := forbidden_claims(text):
        return vpb.ValidateResponse(
            outcome=vpb.VALIDATION_OUTCOME_FAIL,
            violations=_violations(claims),
            reason="forbidden claim",
        )
    if advice := numeric_advice(text):
        return vpb.ValidateResponse(
            outcome=vpb.VALIDATION_OUTCOME_ESCALATE,
            violations=_violations(advice),
            reason="looks like financial advice",
        )
    return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)


class ComplianceValidator(vgrpc.ValidatorServiceServicer):
    async def Validate(
        self, request: vpb.ValidateRequest, context: grpc.aio.ServicerContext
    ) -> vpb.ValidateResponse:
        return judge(request.final_text)

    async def ValidateStream(
        self,
        requests: AsyncIterator[vpb.ValidateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vpb.ValidateStreamResponse]:
        text = ""
        starts: list[int] = []  # byte offset of each window
        async for request in requests:
            event = request.WhichOneof("event")
            if event == "window":
                starts.append(request.window.offset)
                text += request.window.text
                claims = forbidden_claims(text)
                if claims:  # stop the release now, from the window the claim starts in
                    first = claims[0].start
                    window = starts[max(0, bisect.bisect_right(starts, first) - 1)]
                    yield vpb.ValidateStreamResponse(
                        outcome=vpb.VALIDATION_OUTCOME_FAIL,
                        violations=_violations(claims),
                        reason="forbidden claim",
                        window_offset=window,
                    )
                    return
            elif event == "end":
                final = request.end.final_text if request.end.diverged else text
                verdict = judge(final)
                yield vpb.ValidateStreamResponse(
                    outcome=verdict.outcome,
                    violations=verdict.violations,
                    reason=verdict.reason,
                )
                return


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(ComplianceValidator(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"compliance validator listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070, help="0 picks a free port (printed)")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
