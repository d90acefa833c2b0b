"""The TypeScript client (clients/typescript): stubs match the protos, it type-checks
strictly, and its own `node --test` suite passes against a real `tokenwire serve`."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_POLYGLOT, require_tool

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "typescript"
GENERATED = PACKAGE / "src" / "gen"


@pytest.fixture(scope="module")
def npm() -> str:
    require_tool("node")
    npm = require_tool("npm")
    if not (PACKAGE / "node_modules").is_dir():
        message = "clients/typescript/node_modules missing; run scripts/setup.sh"
        if REQUIRE_POLYGLOT:
            pytest.fail(message)
        pytest.skip(message)
    return npm


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, timeout=300, env=env)


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_committed_typescript_stubs_match_the_protos(npm: str, tmp_path: Path) -> None:
    """`npm run generate` into a scratch directory, compared byte for byte with the
    committed stubs (the working tree is not touched)."""
    buf = require_tool("buf")
    result = _run(buf, "generate", "--template", "buf.gen.yaml", "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    fresh = tmp_path / "src" / "gen"
    names = _files(fresh)
    assert names == _files(GENERATED), "generated file set differs: run `npm run generate`"
    assert "tokenwire/v1/respond_pb.ts" in names
    drifted = [n for n in names if not filecmp.cmp(fresh / n, GENERATED / n, shallow=False)]
    assert not drifted, f"stale stubs {drifted}: run `npm run generate` in clients/typescript"


def test_typescript_client_typechecks_strictly(npm: str) -> None:
    result = _run(npm, "run", "--silent", "typecheck")
    assert result.returncode == 0, result.stdout + result.stderr


def test_typescript_client_suite_passes_against_a_real_server(npm: str) -> None:
    env = {
        **os.environ,
        "TOKENWIRE_SERVE_CMD": f"{sys.executable} -m tokenwire.cli serve",
    }
    result = _run(npm, "test", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "# fail 0" in output, output[-8000:]
