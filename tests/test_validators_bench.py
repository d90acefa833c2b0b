"""bench/validator_cost.py runs, tiny, and prints its table (the figures are for docs/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_validator_cost_bench_runs() -> None:
    tiny = ["--responses", "20", "--round", "10", "--warmup", "5", "--text-chars", "200"]
    result = subprocess.run(
        [sys.executable, "bench/validator_cost.py", *tiny],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("  ")[0].strip() for line in result.stdout.splitlines()}
    assert {"none", "validate, process", "stream, process", "validate, in process"} <= rows
