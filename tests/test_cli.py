"""`tokenwire ask` as a user runs it, against a real server."""

from __future__ import annotations

import asyncio
import re
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
