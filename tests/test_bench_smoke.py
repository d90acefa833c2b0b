"""bench/floor.py runs end to end: every server it starts, every path, the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_floor_benchmark_runs_and_prints_its_table() -> None:
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "floor.py"),
            "--rounds", "1", "--calls", "3", "--sizes", "16",
            "--load-streams", "2", "--load-calls", "3",
            "--inflight", "1", "--unary-seconds", "0.3", "--unary-client", "python",
            "--warmup", "0",
        ],
        capture_output=True, text=True, timeout=100, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for row in ("ttft p50 @16", "loaded ttft p50 @16", "req/s @1", "CPU ms/call @1"):
        assert row in out
    assert "tokenwire deployed [" in out and "tokenwire minimal [" in out
    assert "issue 24 targets" in out
