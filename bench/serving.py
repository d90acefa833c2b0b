"""How the benchmarks' own baseline servers listen and stop, written once.

Each prints `<label> serving on HOST:PORT` once listening (what
`per_message.start` waits for) and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from tokenwire.v1 import respond_pb2 as pb

StreamHandler = Callable[[pb.StreamRespondRequest, Any], AsyncIterator[Any]]
UnaryHandler = Callable[[pb.RespondRequest, Any], Awaitable[pb.RespondResponse]]


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_stream_respond(
    stream: StreamHandler, port: int, label: str, respond: UnaryHandler | None = None
) -> None:
    """A bare grpc.aio server answering only `RespondService/StreamRespond`
    (and `Respond`, when `respond` is given)."""
    methods = {
        "StreamRespond": grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=pb.StreamRespondRequest.FromString,
            response_serializer=pb.StreamRespondResponse.SerializeToString,
        )
    }
    if respond is not None:
        methods["Respond"] = grpc.unary_unary_rpc_method_handler(
            respond,
            request_deserializer=pb.RespondRequest.FromString,
            response_serializer=pb.RespondResponse.SerializeToString,
        )
    handler = grpc.method_handlers_generic_handler("tokenwire.v1.RespondService", methods)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"{label} serving on 127.0.0.1:{bound}", flush=True)
    await until_signalled()
    await server.stop(0)


async def serve_http(app: web.Application, port: int, label: str) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"{label} serving on 127.0.0.1:{bound}", flush=True)
    await until_signalled()
    await runner.cleanup()
