"""The Go client (clients/go): committed stubs match the protos, `go vet` is clean,
and its own tests pass against a real `tokenwire serve` that `go test` starts."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

GO_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "go"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    # buf comes with the dev extra, next to this interpreter even when PATH lacks it.
    env["BUF"] = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    env["TOKENWIRE_SERVE_CMD"] = f"{sys.executable} -m tokenwire.cli serve"
    return env


def _run(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=GO_CLIENT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def go() -> str:
    go = require_tool("go")
    require_tool("protoc-gen-go")
    require_tool("protoc-gen-go-grpc")
    return go


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_committed_go_stubs_match_the_protos(go: str, tmp_path: Path) -> None:
    result = _run("bash", str(GO_CLIENT / "generate.sh"), str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    fresh, committed = tmp_path / "gen", GO_CLIENT / "gen"
    assert _files(fresh) == _files(committed)
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, _files(fresh), shallow=False)
    assert not mismatch and not errors, f"run clients/go/generate.sh and commit: {mismatch}"


@pytest.mark.timeout(600)  # a cold module and build cache: downloads and compiles grpc-go
def test_go_vet_and_go_mod_tidy_are_clean(go: str) -> None:
    result = _run(go, "vet", "./...", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run(go, "mod", "tidy", "-diff", timeout=120)
    assert result.returncode == 0, "run `go mod tidy` in clients/go:\n" + result.stdout


@pytest.mark.timeout(600)
def test_go_client_tests_pass_against_a_real_server(go: str) -> None:
    # -count=1: Go's test cache cannot see the server's code, so never reuse a result.
    result = _run(go, "test", "-count=1", "-timeout", "300s", "./...", timeout=560)
    assert result.returncode == 0, result.stdout + result.stderr


#: The counters' tests (clients/go/tokenwire/observed_test.go): a fake server
#: sending a gap, a repeat, a wrong offset, an event after Completed and a long
#: silence, then the real server.
OBSERVED_TESTS = (
    "TestOrderingViolationsAreCountedPerClient",
    "TestAStallIsCountedOnceAndTheStreamGoesOn",
    "TestAStallCanBeTurnedOff",
    "TestAReaderThatPausesIsNotAStall",
    "TestARealServerCountsNothingAndHeartbeatsAreNotStalls",
    "TestARealServerSilentPastTheStallTimeout",
)


@pytest.mark.timeout(600)
def test_go_client_counts_ordering_violations_and_stalls(go: str) -> None:
    """Named so a renamed or deleted counter test fails here, not silently;
    -race because a stall is noticed on a timer's goroutine."""
    pattern = "^(" + "|".join(OBSERVED_TESTS) + ")$"
    argv = (go, "test", "-count=1", "-race", "-v", "-run", pattern, "./tokenwire/")
    result = _run(*argv, timeout=560)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in OBSERVED_TESTS:
        assert f"--- PASS: {name} " in result.stdout, f"{name} did not run:\n{result.stdout}"
