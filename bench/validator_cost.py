"""What one local validator that answers at once adds between the final text and the verdict.

Issue 21 asks that, with one local validator answering at once, `Completed`
leave at most 2 ms later than without it (p50). This measures the runner's
share of that, without a server around it: the time from the final
text to the verdict (`Validators.start` at the response's start, `feed` per
released piece in stream mode, `await run.finish(final_text)` before
`Completed`), per response, in one run:

- `none`: no validator matches (what every response pays when none is
  configured for it: one `start` returning None);
- `validate, process`: a `Validate` call to a validator in another process on
  127.0.0.1 (a sidecar);
- `stream, process`: a `ValidateStream` call opened at the start, the text fed
  in pieces, the end sent and the verdict awaited;
- `validate, in process`: the validator in this process and event loop (what
  a test setup measures; no second process to schedule).

The validator answers PASS without looking at the text. Every row runs in
the same process, interleaved round by round, so the machine's noise spreads
over all of them. Run:

    python bench/validator_cost.py                 # 2,000 responses per row
    python bench/validator_cost.py --responses 500 --text-chars 4000

The end-to-end figure (`Completed` with and without a validator, through two
`tokenwire serve` processes) is bench/validation_path.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tokenwire.v1 import validator_pb2 as vpb
from tokenwire.v1 import validator_pb2_grpc as vgrpc
from tokenwire_server.validators.config import Mode, ValidatorConfig
from tokenwire_server.validators.runner import ResponseFacts, Validators

#: A validator that answers PASS at once, run as its own process.
_SIDECAR = """
import asyncio, sys, grpc
from tokenwire.v1 import validator_pb2 as vpb, validator_pb2_grpc as vgrpc

class Pass(vgrpc.ValidatorServiceServicer):
    async def Validate(self, request, context):
        return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
    async def ValidateStream(self, requests, context):
        async for request in requests:
            if request.WhichOneof("event") == "end":
                yield vpb.ValidateStreamResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
                return

async def main():
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(Pass(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


class _Pass(vgrpc.ValidatorServiceServicer):
    async def Validate(self, request: Any, context: Any) -> vpb.ValidateResponse:
        return vpb.ValidateResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)

    async def ValidateStream(self, requests: Any, context: Any) -> Any:
        async for request in requests:
            if request.WhichOneof("event") == "end":
                yield vpb.ValidateStreamResponse(outcome=vpb.VALIDATION_OUTCOME_PASS)
                return


async def _sidecar() -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SIDECAR, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    match = re.search(r"listening on (\S+)", line)
    assert match, line
    return process, match.group(1)


Case = Callable[[int], Awaitable[tuple[float, float]]]


def _case(validators: Validators, text: str, pieces: list[str]) -> Case:
    """One response: (start to verdict, final text to verdict). Pieces are fed with
    a turn of the event loop between them, as generation would, so a stream
    validator's windows go out while the text is produced."""

    async def one(index: int) -> tuple[float, float]:
        facts = ResponseFacts(response_id=f"rsp-{index}", model="m", tenant="t")
        started = time.perf_counter()
        run = validators.start(facts)
        if run is None:
            return time.perf_counter() - started, 0.0
        for piece in pieces:
            run.feed(piece)
            await asyncio.sleep(0)
        final = time.perf_counter()
        result = await run.finish(text)
        done = time.perf_counter()
        assert result.passed, result.reasons
        return done - started, done - final

    return one


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1e3


def _row(name: str, samples: list[tuple[float, float]]) -> str:
    added = [verdict for _, verdict in samples]
    total = [whole for whole, _ in samples]
    p50 = _percentile(added, 0.5)
    return (
        f"{name:<22} {p50:>9.3f} {_percentile(added, 0.99):>9.3f} "
        f"{statistics.fmean(added) * 1e3:>9.3f} {p50 / 2.0:>8.0%} "
        f"{_percentile(total, 0.5):>11.3f}"
    )


async def main(args: argparse.Namespace) -> None:
    process, address = await _sidecar()
    server = grpc.aio.server()
    vgrpc.add_ValidatorServiceServicer_to_server(_Pass(), server)
    in_process = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    text = ("All good here. " * (args.text_chars // 15 + 1))[: args.text_chars]
    pieces = [text[i : i + 16] for i in range(0, len(text), 16)]
    pools = {
        "none": Validators(),
        "validate, process": Validators([ValidatorConfig("v", address)]),
        "stream, process": Validators(
            [ValidatorConfig("v", address, mode=Mode.STREAM, window_chars=args.window_chars)]
        ),
        "validate, in process": Validators([ValidatorConfig("v", in_process)]),
    }
    cases = {name: _case(pool, text, pieces) for name, pool in pools.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    try:
        for case in cases.values():  # warm: channels connected, code paths hot
            for index in range(args.warmup):
                await case(index)
        rounds = max(1, args.responses // args.round)
        for round_index in range(rounds):
            for name, case in cases.items():
                for index in range(args.round):
                    samples[name].append(await case(round_index * args.round + index))
    finally:
        for pool in pools.values():
            await pool.aclose()
        await server.stop(0)
        process.terminate()
        await process.wait()
    print(
        f"validator_cost: final text -> verdict, one local validator answering PASS at once\n"
        f"({len(samples['none'])} responses per row, interleaved in rounds of {args.round}; "
        f"text {args.text_chars} chars fed in {len(pieces)} pieces, window "
        f"{args.window_chars} chars; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; Python {sys.version.split()[0]}, grpcio {grpc.__version__})\n"
        f"added = from the final text to the verdict (what Completed waits); whole = from "
        f"the response's start (stream: the call opened and the windows sent meanwhile)\n"
    )
    print(
        f"{'case':<22} {'added p50':>9} {'p99':>9} {'mean':>9} {'of 2 ms':>8} "
        f"{'whole p50':>11}   (ms)"
    )
    for name in cases:
        print(_row(name, samples[name]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=2000, help="per row")
    parser.add_argument("--round", type=int, default=100, help="responses per row per round")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--text-chars", type=int, default=1000)
    parser.add_argument("--window-chars", type=int, default=256)
    asyncio.run(main(parser.parse_args()))
