"""A real nginx (Debian's package) in front of tokenwire, started unprivileged for one run.

The fault matrix and `tests/test_nginx_proxy.py` need an HTTP/2 proxy with an
idle timeout, because that is what cuts silent gRPC streams in production:
`grpc_read_timeout` counts the time between two reads from the upstream, not
the length of the call. This module writes a minimal `nginx.conf` (derived
from `deploy/nginx/tokenwire.conf`, with loopback ports, a temporary prefix
for the pid file, logs and temp paths, and no port below 1024), runs
`nginx -g 'daemon off;'` as a child process and stops it again, so nothing
outside the temporary directory is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType

#: Debian installs nginx in /usr/sbin, which is not on every user's PATH.
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

TEMPLATE = """\
# Written by bench/nginx_proxy.py for one run; see deploy/nginx/tokenwire.conf.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream tokenwire {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        # nginx 1.22 (Debian 12) spells HTTP/2 on the listen line; 1.25+ also has `http2 on;`.
        listen 127.0.0.1:{port} http2;
        http2_max_concurrent_streams 512;

        location / {{
            grpc_pass grpc://tokenwire;
            # The idle timeout under test: longest silence between two reads from tokenwire.
            grpc_read_timeout {read_timeout_ms}ms;
            grpc_send_timeout {read_timeout_ms}ms;
            grpc_connect_timeout 5s;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """nginx on PATH, else in the usual sbin directories; None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None)


def free_port() -> int:
    """A loopback port nobody listens on right now (nginx binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def render_config(prefix: Path, port: int, upstream: str, read_timeout: float) -> str:
    return TEMPLATE.format(
        prefix=prefix, port=port, upstream=upstream, read_timeout_ms=round(read_timeout * 1000)
    )


class NginxProxy:
    """`async with NginxProxy(upstream, read_timeout=1.0) as proxy:` then dial `proxy.address`."""

    def __init__(self, upstream: str, read_timeout: float, nginx: str | None = None) -> None:
        self.upstream = upstream
        self.read_timeout = read_timeout
        self.nginx = nginx or find_nginx()
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def error_log(self) -> str:
        """nginx's own account of the run (timeouts show up as `upstream timed out`)."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def start(self) -> str:
        if self.nginx is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
        self._dir = tempfile.TemporaryDirectory(prefix="tokenwire-nginx-")
        prefix = Path(self._dir.name)
        # Workers drop to `nobody` when the master runs as root: let them into the prefix.
        os.chmod(prefix, 0o755)
        self.port = free_port()
        config = prefix / "nginx.conf"
        config.write_text(render_config(prefix, self.port, self.upstream, self.read_timeout))
        self._process = await asyncio.create_subprocess_exec(
            self.nginx,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(config),
            "-g",
            "daemon off;",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await self._wait_listening()
        return self.address

    async def _wait_listening(self, timeout: float = 10.0) -> None:
        """Polls the port until nginx accepts; fails with nginx's stderr if it exits."""
        assert self._process is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            if self._process.returncode is not None:
                stderr = b""
                if self._process.stderr is not None:
                    stderr = await self._process.stderr.read()
                raise RuntimeError(f"nginx exited: {stderr.decode(errors='replace')}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if loop.time() > until:
                    raise TimeoutError(f"nginx did not listen on {self.address}") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    async def __aenter__(self) -> NginxProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
