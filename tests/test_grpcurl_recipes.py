"""The README's grpcurl recipes, run as printed against live `tokenwire serve` processes.

Why: a recipe that is only read drifts the first time a flag, a field or a
health name changes. Each fenced ```bash block of the README's "grpcurl
recipes" section starts with `# recipe: NAME`; this module extracts every
block, starts the server the block names (or a plaintext one), swaps the
documented address 127.0.0.1:50051 for the live one, runs the block with bash
in a directory holding the certificate files the block names (made at run time
with trustme), and checks the output. A recipe added to the README without an
expectation here fails, as does one removed from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import require_tool, start_serve_process
from tests.test_tls import Pki
from tokenwire.v1 import respond_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "docs" / "clients.md"
SECTION = "### grpcurl recipes"
#: The address every recipe is printed with; replaced by the live server's.
DOCUMENTED_ADDRESS = "127.0.0.1:50051"

#: One event loop for the module, so the plaintext server is started once.
module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Recipe:
    """One README block: the server flags it documents (if any) and the commands."""

    name: str
    serve_flags: tuple[str, ...]
    script: str


def section_text(readme: str) -> str:
    """The recipes section: from its heading to the next heading of level 2 or 3."""
    start = readme.index(SECTION + "\n")
    following = re.search(r"^#{2,3} ", readme[start + len(SECTION) :], re.MULTILINE)
    end = start + len(SECTION) + following.start() if following else len(readme)
    return readme[start:end]


def parse_recipes(readme: str) -> dict[str, Recipe]:
    """Every ```bash block of the section, keyed by its `# recipe: NAME` line.

    A `tokenwire serve ...` line is not run: its flags are what the test starts
    the server with (the reader runs it in another terminal)."""
    recipes: dict[str, Recipe] = {}
    for block in re.findall(r"^```bash\n(.*?)^```$", section_text(readme), re.S | re.M):
        first, _, body = block.partition("\n")
        match = re.fullmatch(r"# recipe: ([a-z0-9-]+)", first.strip())
        assert match, f"a recipe block must start with '# recipe: NAME', not {first!r}"
        name = match.group(1)
        assert name not in recipes, f"recipe {name} appears twice"
        flags: tuple[str, ...] = ()
        commands: list[str] = []
        for line in body.splitlines():
            if line.startswith("tokenwire serve"):
                flags = tuple(shlex.split(line, comments=True)[2:])
            else:
                commands.append(line)
        script = "\n".join(commands).strip() + "\n"
        assert DOCUMENTED_ADDRESS in script, f"recipe {name} must dial {DOCUMENTED_ADDRESS}"
        recipes[name] = Recipe(name, flags, script)
    return recipes


RECIPES = parse_recipes(README.read_text(encoding="utf-8"))


def json_documents(text: str) -> list[Any]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return documents
        document, index = decoder.raw_decode(text, index)
        documents.append(document)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


async def run_recipe(script: str, address: str, cwd: Path) -> Outcome:
    """Runs the block with bash, exactly as printed but for the address."""
    require_tool("grpcurl")
    grpcurl_dir = str(Path(require_tool("grpcurl")).parent)
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        f'PATH="$PATH:{grpcurl_dir}"\n' + script.replace(DOCUMENTED_ADDRESS, address),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plaintext_address() -> AsyncIterator[str]:
    """One plaintext server for every recipe that documents none of its own."""
    process, address = await start_serve_process()
    yield address
    await stop(process)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """ca.pem, server.pem/.key (for 127.0.0.1) and client.pem/.key, as the recipes name them."""
    return Pki(tmp_path)


def ok(outcome: Outcome) -> str:
    assert outcome.returncode == 0, outcome.stderr
    return outcome.stdout


def check_list_services(outcome: Outcome) -> None:
    names = ok(outcome).split()
    assert {"tokenwire.v1.RespondService", "grpc.health.v1.Health"} <= set(names)


def check_list_methods(outcome: Outcome) -> None:
    methods = set(ok(outcome).split())
    service = pb.DESCRIPTOR.services_by_name["RespondService"]
    assert methods == {f"{service.full_name}.{m.name}" for m in service.methods}


def check_describe_message(outcome: Outcome) -> None:
    text = ok(outcome)
    assert "message StreamRespondRequest {" in text
    for fd in pb.StreamRespondRequest.DESCRIPTOR.fields:
        assert re.search(rf"\b{fd.name} = {fd.number};", text), fd.name


def unary_completed(outcome: Outcome, text: str) -> None:
    (document,) = json_documents(ok(outcome))
    completed = document["completed"]
    assert completed["final_text"] == text
    assert completed["final_sha256"] == sha256(text)
    assert completed["verification"]["status"] == "VERIFICATION_STATUS_VERIFIED"


def check_respond(outcome: Outcome) -> None:
    unary_completed(outcome, "hello grpcurl")


def check_stream_respond(outcome: Outcome) -> None:
    events = json_documents(ok(outcome))
    chunks = [e["chunk"] for e in events[:-1]]
    completed = events[-1]["completed"]
    assert len(chunks) > 1, "one token per chunk streams several chunks"
    assert [c["sequence"] for c in chunks] == list(range(1, len(chunks) + 1))
    text = "".join(c["text"] for c in chunks)
    assert text == "stream me, one token per chunk"
    assert completed["final_sha256"] == sha256(text)
    assert completed["chunk_count"] == len(chunks)
    assert completed["delivery_mode"] == "DELIVERY_MODE_STREAM"
    assert completed["verification"]["status"] == "VERIFICATION_STATUS_VERIFIED"


def check_tool_calls(outcome: Outcome) -> None:
    events = json_documents(ok(outcome))
    chunks = [e["chunk"] for e in events[:-1]]
    completed = events[-1]["completed"]
    fragments = [c["tool_call"] for c in chunks]
    assert all(not c.get("text") for c in chunks), "fragments carry no text"
    assert fragments[0]["id"] and fragments[0]["name"] == "get_weather"
    assert "".join(f.get("arguments", "") for f in fragments) == '{"city": "Paris"}'
    (call,) = completed["tool_calls"]
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Paris"}')
    assert completed["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
    verification = completed["verification"]
    assert verification["status"] == "VERIFICATION_STATUS_VERIFIED"
    checks = {c["name"]: c["outcome"] for c in verification["checks"]}
    assert checks["tool_arguments"] == "CHECK_OUTCOME_PASSED"
    assert verification["checks_passed"] is True


def check_error_details(outcome: Outcome) -> None:
    assert outcome.returncode == 64 + 5, outcome.stderr  # grpcurl: 64 + NOT_FOUND
    (status,) = json_documents(outcome.stderr)  # a failed call's status goes to stderr
    assert status["code"] == 5
    (info,) = status["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["domain"], info["reason"]) == ("tokenwire.dev", "MODEL_NOT_FOUND")


def check_serving(outcome: Outcome) -> None:
    assert json_documents(ok(outcome)) == [{"status": "SERVING"}]


def check_tls(outcome: Outcome) -> None:
    unary_completed(outcome, "over TLS")


def check_mtls(outcome: Outcome) -> None:
    unary_completed(outcome, "over mTLS")


def check_buf_curl(outcome: Outcome) -> None:
    events = json_documents(ok(outcome))  # buf curl prints JSON names: camelCase
    text = "".join(e["chunk"]["text"] for e in events[:-1])
    assert text == "hi"
    assert events[-1]["completed"]["finalSha256"] == sha256(text)


CHECKS: dict[str, Callable[[Outcome], None]] = {
    "list-services": check_list_services,
    "list-methods": check_list_methods,
    "describe-message": check_describe_message,
    "respond": check_respond,
    "stream-respond": check_stream_respond,
    "tool-calls": check_tool_calls,
    "error-details": check_error_details,
    "health-overall": check_serving,
    "health-service": check_serving,
    "tls": check_tls,
    "mtls": check_mtls,
    "buf-curl": check_buf_curl,
}
PLAINTEXT = sorted(name for name, r in RECIPES.items() if not r.serve_flags)
WITH_SERVER = sorted(name for name, r in RECIPES.items() if r.serve_flags)


def test_every_recipe_has_a_check_and_every_check_a_recipe() -> None:
    assert sorted(RECIPES) == sorted(CHECKS)
    assert set(WITH_SERVER) == {"tls", "mtls"}


@module_loop
@pytest.mark.parametrize("name", PLAINTEXT)
async def test_plaintext_recipe(name: str, plaintext_address: str, tmp_path: Path) -> None:
    if name == "buf-curl" and shutil.which("buf") is None:
        pytest.fail("buf comes with the dev extra (buf-bin)")
    outcome = await run_recipe(RECIPES[name].script, plaintext_address, tmp_path)
    CHECKS[name](outcome)


def absolute(flags: tuple[str, ...], directory: Path) -> list[str]:
    """The documented flags, with the certificate file names made absolute (the
    server process runs elsewhere; the grpcurl commands run in `directory`)."""
    return [str(directory / f) if (directory / f).is_file() else f for f in flags]


@module_loop
@pytest.mark.parametrize("name", WITH_SERVER)
async def test_recipe_with_its_own_server(name: str, pki: Pki) -> None:
    recipe = RECIPES[name]
    for flag in ("--tls-cert", "--tls-key"):
        assert flag in recipe.serve_flags
    process, address = await start_serve_process(*absolute(recipe.serve_flags, pki.directory))
    try:
        CHECKS[name](await run_recipe(recipe.script, address, pki.directory))
        # The TLS flags are what gets grpcurl in: without them the same call fails
        # (grpcurl keeps retrying a failing handshake until its connect timeout).
        quick = recipe.script.replace("grpcurl ", "grpcurl -connect-timeout 2 ", 1)
        plain = re.sub(r" -(cacert|cert|key) \S+", "", quick)
        plain = plain.replace("grpcurl ", "grpcurl -plaintext ", 1)
        assert (await run_recipe(plain, address, pki.directory)).returncode != 0
        if name == "mtls":
            without_cert = re.sub(r" -(cert|key) \S+", "", quick)
            assert (await run_recipe(without_cert, address, pki.directory)).returncode != 0
    finally:
        await stop(process)


@module_loop
async def test_health_recipes_turn_not_serving_while_draining(tmp_path: Path) -> None:
    """What the README says and the Kubernetes readiness probe relies on: from
    SIGTERM on, both "" and the service answer NOT_SERVING (during drain_delay
    the server still answers, so the probe sees it before calls are refused)."""
    process, address = await start_serve_process("--drain-delay", "3", "--grace-period", "1")
    try:
        check_serving(await run_recipe(RECIPES["health-service"].script, address, tmp_path))
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        for name in ("health-overall", "health-service"):
            outcome = await run_recipe(RECIPES[name].script, address, tmp_path)
            assert json_documents(ok(outcome)) == [{"status": "NOT_SERVING"}], name
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        await stop(process)
