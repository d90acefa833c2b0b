"""The TypeScript client (clients/typescript): stubs match the protos, it type-checks
strictly, and its own `node --test` suite passes against a real `tokenwire serve`.

The code is compiled into a directory of this run's own inside the package
(node finds node_modules from there), not into dist/: `npm test` and `npm run
example` start with `rm -rf dist`, so two suites sharing a checkout would delete
each other's build mid-run."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_POLYGLOT, require_tool, start_serve_process

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
    return subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, timeout=540, env=env)


@pytest.fixture(scope="module")
def built(npm: str) -> Iterator[Path]:
    """`tsc` (the package's tsconfig) into a private directory, removed afterwards."""
    out = PACKAGE / f".pytest-build-{uuid.uuid4().hex[:12]}"
    try:
        result = _run(
            "node", "node_modules/typescript/bin/tsc", "-p", "tsconfig.json", "--outDir", str(out)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


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


@pytest.mark.timeout(600)  # tsc and node on a busy machine
def test_typescript_client_typechecks_strictly(npm: str) -> None:
    result = _run(npm, "run", "--silent", "typecheck")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)  # tsc and node on a busy machine
def test_typescript_client_suite_passes_against_a_real_server(built: Path) -> None:
    """What `npm test` runs, on this run's own build."""
    env = {
        **os.environ,
        "TOKENWIRE_SERVE_CMD": f"{sys.executable} -m tokenwire.cli serve",
    }
    tests = sorted(str(p) for p in (built / "test").glob("*.test.js"))
    assert any(t.endswith("observed.test.js") for t in tests), tests
    result = _run("node", "--test", "--test-concurrency=1", *tests, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "# fail 0" in output, output[-8000:]


def _example_options() -> list[str]:
    """The options examples/stream.ts declares to parseArgs (its OPTIONS table)."""
    source = (PACKAGE / "examples" / "stream.ts").read_text(encoding="utf-8")
    table = source[
        source.index("const OPTIONS = {") : source.index('satisfies ParseArgsConfig["options"]')
    ]
    return re.findall(r'^\s+"?([a-z][a-z-]*)"?: \{ type:', table, flags=re.MULTILINE)


@pytest.mark.timeout(600)  # tsc and node on a busy machine
def test_typescript_example_help_lists_every_option(built: Path) -> None:
    """`npm run example -- --help` printed a parseArgs stack trace (node:util's
    parseArgs is strict and --help was not declared); now it prints the usage,
    naming every option the example accepts, and exits 0. A wrong option is
    exit status 2 with the problem and the usage, not a stack trace. (npm hands
    what follows `--` to the script; the script is node on the compiled example,
    run here on this run's build so no `rm -rf dist` races another suite.)"""
    scripts = json.loads((PACKAGE / "package.json").read_text(encoding="utf-8"))["scripts"]
    assert scripts["example"].endswith("node dist/examples/stream.js")
    example = str(built / "examples" / "stream.js")
    options = _example_options()
    assert {"help", "address", "mode", "stall-timeout", "no-resume"} <= set(options)
    shown = _run("node", example, "--help")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.startswith('usage: npm run example -- [options] "prompt"'), shown.stdout
    for option in options:
        assert f"--{option}" in shown.stdout, f"--{option} missing from the example's --help"
    short = _run("node", example, "-h")
    assert short.returncode == 0 and short.stdout == shown.stdout
    for argv, problem in (
        (["--bogus", "hi"], "Unknown option '--bogus'"),
        (["--timeout"], "argument missing"),
        (["--mode", "fast", "hi"], "unknown --mode fast"),
        ([], "no prompt given"),
    ):
        wrong = _run("node", example, *argv)
        assert wrong.returncode == 2, (argv, wrong.stdout, wrong.stderr)
        assert problem in wrong.stderr and "usage: npm run example" in wrong.stderr, wrong.stderr
        assert "    at " not in wrong.stderr, f"a stack trace for {argv}:\n{wrong.stderr}"


@pytest.mark.timeout(600)  # tsc and node on a busy machine
async def test_typescript_example_streams_from_a_real_server(built: Path) -> None:
    process, address = await start_serve_process()
    try:
        result = await asyncio.to_thread(
            _run,
            "node",
            str(built / "examples" / "stream.js"),
            "--address",
            address,
            "--model",
            "echo",
            "--mode",
            "stream",
            "hello from the example",
        )
    finally:
        process.terminate()
        await process.wait()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "hello from the example\n"
    assert "verified" in result.stderr and "NOT VERIFIED" not in result.stderr, result.stderr
