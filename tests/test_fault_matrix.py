"""The fault matrix (bench/faults.py), reduced: 10 streams per fault, short timings.

Each fault runs against its own `tokenwire serve` process exactly as the
script does, so these tests hold the invariants the documented run reports:
no silent loss, no reordering, no divergence without retraction, the
expected completions and clean statuses, and a healthy server afterwards.
The faults run concurrently (one server each) once per module, so the whole
file costs about as long as its slowest fault; each test then checks one row.
The nginx rows live in tests/test_nginx_proxy.py (they need Debian's nginx).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import faults  # noqa: E402

Rows = dict[str, faults.Row]

STREAMS = 10
QUICK = faults.MatrixConfig(
    streams=STREAMS,
    slow_seconds=2.0,
    proxy_timeout=0.5,
    silence=1.0,
    stall_timeout=0.5,
    deadline=0.5,
    idle_window=0.5,
)


@pytest.fixture(scope="module")
def matrix() -> Rows:
    """Every non-proxy fault of the matrix, run concurrently once for this module."""

    async def run() -> Rows:
        runs = {
            "failure": faults.fault_backend_failure(QUICK),
            "stall": faults.fault_backend_stall(QUICK),
            "disconnect": faults.fault_client_disconnect(QUICK),
            "deadline": faults.fault_deadline_client(QUICK),
            "server-deadline": faults.fault_deadline_server(QUICK),
            "slow-consumer": faults.fault_slow_consumer(QUICK),
            "sigterm": faults.fault_sigterm(QUICK),
            "sigterm-grace": faults.fault_sigterm(QUICK, outlive_grace=True),
        }
        rows = await asyncio.gather(*runs.values())
        return dict(zip(runs, rows, strict=True))

    return asyncio.run(run())


def assert_invariants(row: faults.Row) -> None:
    """What must hold for every fault, whatever its expected outcome."""
    detail = faults.render([row], markdown=False)
    assert row.losses == 0, detail
    assert row.reorders == 0, detail
    assert row.unretracted == 0, detail
    assert row.server_ok, detail
    assert len(row.results) == STREAMS, detail


def test_backend_failure_ends_every_stream_with_its_last_sequence(matrix: Rows) -> None:
    row = matrix["failure"]
    assert_invariants(row)
    assert row.clean == STREAMS, faults.render([row], False)
    assert {r.reason for r in row.results} == {"BACKEND_FAILED"}
    # fail-after 0..9: the streams really failed at different points, some before any chunk.
    assert len({r.chunks for r in row.results}) > 1
    assert min(r.chunks for r in row.results) == 0
    assert row.passed, faults.render([row], False)


def test_backend_stall_sends_heartbeats_then_a_clean_status(matrix: Rows) -> None:
    row = matrix["stall"]
    assert_invariants(row)
    assert row.clean == STREAMS
    assert {r.reason for r in row.results} == {"BACKEND_STALLED"}
    assert all(r.heartbeats > 0 for r in row.results), faults.render([row], False)
    assert row.passed, faults.render([row], False)


def test_client_disconnect_frees_the_server(matrix: Rows) -> None:
    row = matrix["disconnect"]
    assert_invariants(row)
    assert row.clean == STREAMS
    assert {r.code for r in row.results} == {"CANCELLED"}
    assert row.passed, faults.render([row], False)


def test_caller_deadline_stops_generation(matrix: Rows) -> None:
    row = matrix["deadline"]
    assert_invariants(row)
    assert {r.code for r in row.results} == {grpc.StatusCode.DEADLINE_EXCEEDED.name}
    assert row.clean == STREAMS
    assert row.passed, faults.render([row], False)


def test_server_deadline_cap_ends_streams_with_their_last_sequence(matrix: Rows) -> None:
    row = matrix["server-deadline"]
    assert_invariants(row)
    assert row.clean == STREAMS
    assert {r.reason for r in row.results} == {"DEADLINE_EXCEEDED"}
    assert all(r.chunks > 0 for r in row.results)
    assert row.passed, faults.render([row], False)


def test_slow_consumer_completes_with_coalesced_chunks(matrix: Rows) -> None:
    row = matrix["slow-consumer"]
    assert_invariants(row)
    assert row.completed == STREAMS
    assert row.tokens_per_chunk > 1, faults.render([row], False)
    assert row.passed, faults.render([row], False)


def test_sigterm_drains_every_stream_to_completed(matrix: Rows) -> None:
    row = matrix["sigterm"]
    assert_invariants(row)
    assert row.completed == STREAMS
    assert row.passed, faults.render([row], False)


def test_sigterm_past_the_grace_period_ends_streams_with_their_last_sequence(
    matrix: Rows,
) -> None:
    """Found by this matrix (UNAVAILABLE "Cancelling all calls", no trailers); fixed on
    main by stopping responses shortly before the grace period ends."""
    row = matrix["sigterm-grace"]
    assert_invariants(row)
    assert row.unsequenced == 0, faults.render([row], False)
    assert row.clean == STREAMS
    assert {(r.code, r.reason) for r in row.results} == {("CANCELLED", "RESPONSE_CANCELLED")}
    assert row.passed, faults.render([row], False)
