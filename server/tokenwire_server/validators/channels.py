"""One gRPC channel per validator address, shared by every response.

A channel multiplexes all calls to its validator over one HTTP/2 connection,
so a response pays no connection set-up. Reconnection backoff is short
(100 ms to 2 s instead of grpc's 1 s to 120 s): a validator that restarts is
used again within seconds, and while it is down each call fails at once
(UNAVAILABLE, no waiting for it to come back), so its error rule applies
without spending its timeout.

Channels are counted by user: a reload that drops or changes a validator
closes its channel once the last response using it has finished.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import grpc

from tokenwire_server.validators.config import ValidatorConfig

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Not grpc.min_reconnect_backoff_ms: grpc core also takes it as the time a
    # connection attempt may take (20 s by default); at 100 ms a busy machine's
    # handshake fails and a healthy validator looks down.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    tls: bool
    tls_ca: str
    tls_server_name: str

    @classmethod
    def of(cls, config: ValidatorConfig) -> Target:
        return cls(config.address, config.uses_tls, config.tls_ca, config.tls_server_name)


class _Entry:
    __slots__ = ("channel", "users", "wanted")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.users = 0
        self.wanted = True


class ChannelPool:
    def __init__(self) -> None:
        self._entries: dict[Target, _Entry] = {}
        self._closing: set[grpc.aio.Channel] = set()

    def _open(self, target: Target) -> grpc.aio.Channel:
        options = list(CHANNEL_OPTIONS)
        if not target.tls:
            return grpc.aio.insecure_channel(target.address, options=options)
        roots = Path(target.tls_ca).read_bytes() if target.tls_ca else None
        if target.tls_server_name:
            options.append(("grpc.ssl_target_name_override", target.tls_server_name))  # type: ignore[arg-type]
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(target.address, credentials, options=options)

    def acquire(self, config: ValidatorConfig) -> grpc.aio.Channel:
        target = Target.of(config)
        entry = self._entries.get(target)
        if entry is None:
            entry = self._entries[target] = _Entry(self._open(target))
        entry.users += 1
        return entry.channel

    def release(self, config: ValidatorConfig) -> None:
        target = Target.of(config)
        entry = self._entries.get(target)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0 and not entry.wanted:
            del self._entries[target]
            self._close_later(entry.channel)

    def retain(self, configs: tuple[ValidatorConfig, ...]) -> None:
        """After a reload: channels no validator names any more close when unused."""
        wanted = {Target.of(c) for c in configs}
        for target, entry in list(self._entries.items()):
            entry.wanted = target in wanted
            if not entry.wanted and entry.users <= 0:
                del self._entries[target]
                self._close_later(entry.channel)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        self._closing.add(channel)

    async def collect(self) -> None:
        """Closes the channels that were let go (called between responses)."""
        closing, self._closing = self._closing, set()
        for channel in closing:
            with contextlib.suppress(Exception):
                await channel.close()

    async def aclose(self) -> None:
        for entry in self._entries.values():
            self._closing.add(entry.channel)
        self._entries.clear()
        await self.collect()
