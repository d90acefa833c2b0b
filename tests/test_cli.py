"""`tokenwire ask` as a user runs it, against a real server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import subprocess
import sys

from tests.conftest import RunningServer


async def ask(server: RunningServer, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "ask",
        "--target",
        server.address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


SUMMARY = re.compile(
    r"\[(?P<mode>\w+) · (?P<chunks>\d+) chunks · sha256 [0-9a-f]{12}… verified · "
    r"ttft [\d.]+ ms · total [\d.]+ ms · stop · allowed · \d+ tokens\]"
)


async def test_ask_streams_and_prints_a_summary(server: RunningServer) -> None:
    code, out, err = await ask(server, "--model", "echo", "stream me please")
    assert code == 0
    assert out == "stream me please\n"
    match = SUMMARY.search(err)
    assert match and match["mode"] == "stream" and int(match["chunks"]) > 1


async def test_ask_buffered_and_unary(server: RunningServer) -> None:
    code, out, err = await ask(server, "--model", "echo", "--buffered", "whole")
    assert code == 0 and out == "whole\n"
    match = SUMMARY.search(err)
    assert match and match["mode"] == "buffered" and match["chunks"] == "1"
    code, out, err = await ask(server, "--model", "echo", "--unary", "whole")
    assert code == 0 and out == "whole\n"
    match = SUMMARY.search(err)
    assert match and match["mode"] == "unary" and match["chunks"] == "0"


async def test_ask_reports_errors_with_their_fields(server: RunningServer) -> None:
    code, _, err = await ask(server, "--max-tokens", "999999", "too long")
    assert code == 1
    assert "INVALID_ARGUMENT MAX_TOKENS_TOO_LARGE" in err
    assert "params.max_tokens" in err


async def test_ask_resume_by_hand(server: RunningServer) -> None:
    from tokenwire.v1 import respond_pb2 as pb

    request = pb.StreamRespondRequest(
        model="echo",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="abcdefghijkl")],
        delivery_mode=pb.DELIVERY_MODE_STREAM,
        chunking=pb.Chunking(max_tokens_per_chunk=1),
        resumable=True,
        labels={"tokenwire.sim/echo-token-chars": "3"},
    )
    events = [e async for e in server.stub.StreamRespond(request)]
    response_id = events[-1].completed.response_id
    code, out, err = await ask(server, "--resume", response_id, "--after", "2")
    assert code == 0, err
    assert out == "ghijkl\n"
    assert "resumed after 2, server verified" in err


async def test_ctrl_c_cancels_the_response_on_the_server(server: RunningServer) -> None:
    import signal

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "ask",
        "--target",
        server.address,
        "--label",
        "tokenwire.sim/inter-token-ms=20",
        "--label",
        "tokenwire.sim/answer-tokens=500",
        "a long answer please",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    await asyncio.wait_for(process.stdout.read(8), timeout=30)  # the answer is streaming
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 130 and b"cancelled" in err
    # The stream was resumable (the default), so only the explicit Cancel stops it.
    await asyncio.wait_for(server.simulator.cancelled.wait(), timeout=5)
    assert server.simulator.stats.finished == 0


SLOW = ("--label", "tokenwire.sim/inter-token-ms=20", "--label", "tokenwire.sim/answer-tokens=60")


async def start_ask(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.cli",
        "ask",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_a_dropped_connection_is_resumed_and_ttft_timed_from_the_resume(
    server: RunningServer,
) -> None:
    from tests.tcp_proxy import CuttableProxy

    host, port = server.address.split(":")
    proxy = CuttableProxy(host, int(port))
    address = await proxy.start()
    try:
        process = await start_ask("--target", address, *SLOW, "a long answer please")
        assert process.stdout is not None
        head = await asyncio.wait_for(process.stdout.read(8), timeout=30)
        proxy.cut()  # the network drops mid-stream; the proxy still takes new connections
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        await proxy.close()
    assert process.returncode == 0, err.decode()
    assert proxy.connections == 2
    summary = err.decode()
    assert re.search(r"verified · ttft [\d.]+ ms from resume · total", summary), summary
    assert len(head + out) > 100


async def test_a_stream_that_cannot_be_resumed_now_prints_the_command_for_later(
    server: RunningServer,
) -> None:
    from tests.tcp_proxy import CuttableProxy

    host, port = server.address.split(":")
    proxy = CuttableProxy(host, int(port))
    address = await proxy.start()
    process = await start_ask("--target", address, *SLOW, "a long answer please")
    assert process.stdout is not None
    head = await asyncio.wait_for(process.stdout.read(8), timeout=30)
    await proxy.close()  # down for good: the client's own resumes fail too
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1
    text = err.decode()
    held = re.search(r"response (rsp_\w+), last sequence received: (\d+)", text)
    assert held, text
    command = re.search(r"resume with: (.*)", text)
    assert command, text
    words = shlex.split(command[1])
    assert words == ["tokenwire", "ask", "--target", address, "--resume", held[1], "--after",
                     held[2]]  # fmt: skip
    # Run as printed, pointed at the server itself: the rest of the answer, verified.
    code, rest, summary = await ask(server, *words[4:], "--show-completed")
    assert code == 0, summary
    assert f"resumed after {held[2]}, server verified" in summary
    rest_text, _, document = rest.partition("\n{")
    before = (head + out).decode().removesuffix("\n")  # the failure ends the line
    assert before + rest_text == json.loads("{" + document)["finalText"]


async def test_a_response_the_server_ended_gets_no_resume_advice(server: RunningServer) -> None:
    code, _, err = await ask(
        server,
        *("--label", "tokenwire.sim/inter-token-ms=20", "--label", "tokenwire.sim/fail-after=6"),
        "fail part way",
    )
    assert code == 1
    assert "UNAVAILABLE BACKEND_FAILED" in err
    assert "resume with" not in err and "--resume" not in err


async def test_show_completed_prints_json_to_stdout(server: RunningServer) -> None:
    code, out, err = await ask(server, "--model", "echo", "--show-completed", "json please")
    assert code == 0
    text, _, document = out.partition("\n")
    assert text == "json please"
    assert json.loads(document)["finalText"] == "json please"
    assert "finalSha256" not in err


def run_tokenwire(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_names_client_and_server() -> None:
    from importlib import metadata

    result = run_tokenwire("--version")
    assert result.returncode == 0
    client, server = result.stdout.splitlines()
    assert client.startswith(f"tokenwire {metadata.version('tokenwire')} (Python ")
    assert server == f"tokenwire-server {metadata.version('tokenwire-server')}"


def test_the_server_adds_its_commands_through_entry_points() -> None:
    from importlib import metadata

    names = {ep.name for ep in metadata.entry_points(group="tokenwire.commands")}
    assert {"serve", "audit", "keys"} <= names
    listing = run_tokenwire("--help").stdout
    assert all(f"    {name}" in listing for name in ("ask", "serve", "audit", "keys"))
    assert "needs tokenwire-server" not in listing
    hashed = run_tokenwire("keys", "hash", stdin="tw_secret\n")
    assert hashed.returncode == 0
    assert hashed.stdout.strip() == hashlib.sha256(b"tw_secret").hexdigest()
    assert run_tokenwire("keys", "hash").returncode == 2
