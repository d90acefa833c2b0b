"""The benchmarks run end to end: every server they start, every path, the table."""

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


def test_first_token_split_runs_and_splits_each_path() -> None:
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "first_token_split.py"),
            "--rounds", "1", "--calls", "4", "--load-streams", "2",
        ],
        capture_output=True, text=True, timeout=100, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if "|" in line]
    by_path = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[1:]}
    assert set(by_path) >= {"bare relay, quiet", "bare relay, loaded"}
    assert any(name.startswith("tokenwire deployed [") for name in by_path)
    for cells in by_path.values():
        to_upstream, back, total = (float(cell) for cell in cells[:3])
        # Both sides of the upstream are real times and add up to the total.
        assert to_upstream > 0 and back > 0
        assert abs(to_upstream + back - total) < 0.25 * total
