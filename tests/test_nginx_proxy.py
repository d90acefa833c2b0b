"""tokenwire behind a real nginx (Debian's package, `grpc_pass`) with a short idle timeout.

nginx's `grpc_read_timeout` resets a stream that stays silent longer than it,
which is exactly what a slow model does between tokens. Heartbeats are the
contract's answer; these tests prove it against the real proxy, prove the
control (no heartbeat inside the timeout: nginx cuts the stream and the caller
sees an error, never a silent OK), and check that the example configuration
in deploy/nginx/ is one nginx accepts.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import faults  # noqa: E402
from nginx_proxy import find_nginx  # noqa: E402

STREAMS = 5
#: nginx cuts after 0.5 s of upstream silence; the model is silent 1 s between tokens.
QUICK = faults.MatrixConfig(streams=STREAMS, proxy_timeout=0.5, silence=1.0, idle_window=0.5)


@pytest.fixture
def nginx() -> str:
    """nginx's path: PATH first, then /usr/sbin (Debian), else skip (or fail in CI)."""
    return find_nginx() or require_tool("nginx")


async def test_heartbeats_keep_a_silent_stream_alive_through_nginx(nginx: str) -> None:
    row = await faults.fault_nginx(QUICK, "heartbeats")
    detail = faults.render([row], markdown=False)
    assert row.completed == STREAMS, detail
    assert row.losses == row.reorders == row.unretracted == 0, detail
    # Each 1 s silence is longer than nginx's timeout and was bridged by heartbeats.
    assert all(r.heartbeats >= 2 for r in row.results), detail
    assert row.proxy_timeouts == 0, detail
    assert row.passed, detail


async def test_without_heartbeats_nginx_cuts_the_stream_and_the_caller_sees_an_error(
    nginx: str,
) -> None:
    row = await faults.fault_nginx(QUICK, "control")
    detail = faults.render([row], markdown=False)
    assert row.completed == 0, detail
    # An error status, never OK without Completed: the caller knows the stream broke.
    assert row.losses == 0, detail
    assert row.clean + row.unsequenced == STREAMS, detail
    assert {r.code for r in row.results} <= {"INTERNAL", "UNAVAILABLE"}, detail
    # What the caller got before the cut is still a correct prefix: sequence 1 only.
    assert all(r.chunks == 1 for r in row.results), detail
    assert row.proxy_timeouts == STREAMS, detail  # nginx's error log: "upstream timed out"
    assert row.passed, detail


async def test_a_failure_behind_nginx_reaches_the_caller_with_its_last_sequence(
    nginx: str,
) -> None:
    """nginx passes grpc-status-details-bin and tokenwire-last-sequence through."""
    row = await faults.fault_nginx(QUICK, "failure")
    detail = faults.render([row], markdown=False)
    assert row.clean == STREAMS, detail
    assert {r.reason for r in row.results} == {"BACKEND_FAILED"}, detail
    assert row.losses == row.reorders == row.unretracted == 0, detail
    assert row.passed, detail


async def test_the_deployment_example_is_valid_nginx_configuration(nginx: str) -> None:
    """`nginx -t` on deploy/nginx/tokenwire.conf inside a minimal main configuration."""
    trustme = pytest.importorskip("trustme")
    example = (ROOT / "deploy" / "nginx" / "tokenwire.conf").read_text()
    assert re.search(r"grpc_pass grpc://", example)
    assert re.search(r"grpc_read_timeout \d+s;", example)
    with tempfile.TemporaryDirectory() as directory:
        prefix = Path(directory)
        ca = trustme.CA()
        cert = ca.issue_cert("tokenwire.example.com")
        cert.private_key_and_cert_chain_pem.write_to_path(str(prefix / "server.pem"))
        snippet = example.replace(
            "/etc/ssl/tokenwire/fullchain.pem", str(prefix / "server.pem")
        ).replace("/etc/ssl/tokenwire/privkey.pem", str(prefix / "server.pem"))
        (prefix / "tokenwire.conf").write_text(snippet)
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log;\n"
            "events {}\n"
            f"http {{\n  client_body_temp_path {prefix}/body;\n"
            f"  include {prefix}/tokenwire.conf;\n}}\n"
        )
        process = await asyncio.create_subprocess_exec(
            nginx,
            "-t",
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(prefix / "nginx.conf"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"},
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode(errors="replace")
