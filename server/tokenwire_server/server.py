"""Assembles and runs the gRPC server: service, health, reflection, graceful drain.

Health answers SERVING for "" and the RespondService only once the server is
listening, and NOT_SERVING from the moment a drain begins. A drain refuses new
calls, gives in-flight ones `grace_period` seconds, then cancels the rest.

Why one module: it is the assembly of everything else (listeners, health,
reflection, reload, drain) in start-up order; each part it wires is its own
module.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from tokenwire_server.audit.store import AuditStore, SqliteAuditStore
from tokenwire_server.auth import Authenticator
from tokenwire_server.backends.base import Backend
from tokenwire_server.backends.factory import build_backends
from tokenwire_server.backends.registry import BackendRegistry
from tokenwire_server.config import Config
from tokenwire_server.errors import ServerStopping
from tokenwire_server.governance.holder import PolicyHolder
from tokenwire_server.governance.policy import Policy
from tokenwire_server.interceptors import build_chain, other_service_guards
from tokenwire_server.interceptors.other_services import GuardedRegistrar
from tokenwire_server.observability.metrics import Metrics
from tokenwire_server.observability.stall_watch import StallWatch
from tokenwire_server.reflection import enable_reflection
from tokenwire_server.reload import RELOAD_FILES, LoadError, Outcome, one_line
from tokenwire_server.review import open_review_desk
from tokenwire_server.review.access import ReviewAccess
from tokenwire_server.review.service import REVIEW_SERVICE_NAME, add_review_service
from tokenwire_server.routing import RoutingReloader
from tokenwire_server.servicer import RespondServicer
from tokenwire_server.store.base import ResponseStore
from tokenwire_server.store.memory import InMemoryResponseStore
from tokenwire_server.store.redis_store import RedisResponseStore
from tokenwire_server.telemetry import Tracing, build_tracing
from tokenwire_server.tls import TlsCredentials
from tokenwire_server.validators.runner import Validators
from tokenwire_server.wire import SERVICE_NAME

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


#: Time after the grace period for readers of stopped responses to send their
#: status with the last sequence, before grpc core cuts the remaining calls.
_STATUS_MARGIN = 1.0


class TokenwireServer:
    """One server instance; `start` binds, `drain` stops gracefully."""

    def __init__(
        self,
        config: Config,
        *,
        backends: Sequence[Backend] | None = None,
        policy: Policy | None = None,
        tracer_provider: TracerProvider | None = None,
        config_file: Path | None = None,
    ) -> None:
        """Loads everything the server needs before it binds; a file that cannot
        be used is a LoadError of one line (the CLI prints it and exits 2)."""
        self.config = config
        self.metrics = Metrics()
        self.authenticator = (
            Authenticator(config.auth.auth_keys_file) if config.auth.auth_keys_file else None
        )
        self.tls = TlsCredentials(config.network) if config.network.tls_cert else None
        self.policies = (
            PolicyHolder(policy)
            if policy is not None
            else PolicyHolder.from_source(config.governance.policy)
        )
        if backends is not None:
            self.backends, default_model = list(backends), config.models.default_model
        else:
            self.backends, default_model = build_backends(config)
        try:
            self.registry = BackendRegistry(self.backends, default_model)
        except ValueError as error:
            raise LoadError(f"models: {error}") from None
        self.metrics.routes = self.registry  # providers and models for the GenAI labels
        #: The callers' validators (`[[validators]]` in the config file).
        self.validators = Validators(config.validators, on_check=self.metrics.count_check)
        self.routing = (
            RoutingReloader(config, config_file, self.registry, self.validators)
            if config_file is not None
            else None
        )
        for name, _ in self._reloaders():
            self.metrics.config_last_good_load.labels(file=name).set_to_current_time()
        try:
            self.audit_store: AuditStore = SqliteAuditStore(config.audit.audit_path)
        except (sqlite3.Error, OSError) as error:
            raise LoadError(f"audit_path: {config.audit.audit_path}: {error}") from None
        #: Human review (issue 21): the response path opens reviews with `reviews.open`.
        self.reviews = open_review_desk(
            config.resume.store,
            config.reviews.review_path,
            config.audit.audit_path,
            self.audit_store,
            self.metrics,
        )
        resume = config.resume
        self.store: ResponseStore
        if resume.store == "memory":
            self.store = InMemoryResponseStore(
                resume.retention, resume.store_max_responses, resume.store_max_bytes
            )
        else:
            self.store = RedisResponseStore(
                resume.store,
                retention=resume.retention,
                lease_seconds=resume.lease_seconds,
                running_ttl=config.deadlines.max_deadline + resume.retention,
                max_responses=resume.store_max_responses,
                max_bytes=resume.store_max_bytes,
            )
        # Stalls are reported at a third of `stall_timeout` (10 s by default), so an
        # alert fires while the stream is still open, well before the watchdog fails it.
        self.stall_watch = StallWatch(
            self.store.running_here, self.metrics.registry, config.deadlines.stall_timeout / 3
        )
        #: Bound port of /metrics, when served.
        self.metrics_port: int | None = None
        #: Bound port of the plaintext health-only listener, when served.
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self.tracing = Tracing(tracer_provider) if tracer_provider is not None else build_tracing()
        self.tracer_provider = self.tracing.provider
        if self.tracing.export is not None:
            self.tracing.export.on_outcome = self.metrics.count_spans
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        #: Continues responses of replicas that died (a shared store hands them over).
        self._adopting: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        net = self.config.network
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", net.max_message_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", int(self.config.quotas.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.config.quotas.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    int(self.config.quotas.min_client_ping_interval * 1000),
                ),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_connection_idle_ms", int(self.config.quotas.max_connection_idle * 1000)),
                ("grpc.max_connection_age_ms", int(self.config.quotas.max_connection_age * 1000)),
                (
                    "grpc.max_connection_age_grace_ms",
                    int(self.config.quotas.max_connection_age_grace * 1000),
                ),
            ],
        )
        servicer = RespondServicer(
            self.config,
            self.registry,
            self.policies,
            self.store,
            validators=self.validators,
            reviews=self.reviews,
        )
        chain = build_chain(
            self.config, self.tracer_provider, self.audit_store, self.metrics, self.authenticator
        )
        chain.register(servicer, server)
        self._adopting = asyncio.create_task(servicer.adopt_orphans(), name="adopt orphans")
        others = GuardedRegistrar(server, other_service_guards(self.config, self.authenticator))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, others)
        access = ReviewAccess(self.authenticator, self.config.auth.auth_mtls)
        add_review_service(self.reviews, access, others)
        self.reviews.start()
        enable_reflection(  # v1 and v1alpha
            (SERVICE_NAME, REVIEW_SERVICE_NAME, HEALTH_SERVICE_NAME), others
        )
        address = f"{net.host}:{net.port}" if ":" not in net.host else f"[{net.host}]:{net.port}"
        try:
            if self.tls is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self.tls.credentials())
        except RuntimeError as error:  # grpc: "Failed to bind to address ..."
            raise LoadError(f"port: cannot listen on {address}: {error}") from None
        await server.start()
        if net.health_port >= 0:
            await self._start_health_listener(net.host, net.health_port)
        observability = self.config.observability
        if observability.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(
                observability.metrics_host, observability.metrics_port
            )
        self._server = server
        self.stall_watch.start()
        for service in ("", SERVICE_NAME, REVIEW_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _start_health_listener(self, host: str, port: int) -> None:
        """Kubernetes' native gRPC probes speak plaintext only, so a TLS port cannot
        be probed; this listener answers health (the same servicer, so it turns
        NOT_SERVING with the drain) and nothing else."""
        listener = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, listener)
        address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.health_port = listener.add_insecure_port(address)
        await listener.start()
        self._health_server = listener

    async def drain(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, refuse new calls, let in-flight ones finish within grace."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.network.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.config.network.drain_delay > 0:
            await asyncio.sleep(self.config.network.drain_delay)
        self.reviews.stop_watching()  # WatchReview streams end now: UNAVAILABLE, watch again
        await self._stop_calls(self._server, grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.close()

    async def close(self) -> None:
        """Releases what `__init__` opened; `drain` ends with it, `--check-config` only this."""
        if self.routing is not None:
            await self.routing.aclose()
        if self._adopting is not None:
            self._adopting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopting
        await self.stall_watch.stop()
        await self.validators.aclose()
        await self.registry.aclose()
        await self.reviews.aclose()
        await self.audit_store.close()
        await self.store.close()
        self.metrics.stop()
        await self.tracing.aclose()

    async def _stop_calls(self, server: grpc.aio.Server, grace: float) -> None:
        """Lets calls finish within `grace`; then stops what is still generating
        here alone, so each reader ends with CANCELLED / RESPONSE_CANCELLED and
        its last sequence, and ends the readers of shared responses (which
        another replica continues) with UNAVAILABLE / SERVER_STOPPING and theirs.
        grpc core gets `_STATUS_MARGIN` more before it cuts whatever is left
        with its bare "Cancelling all calls" (no trailers)."""
        stopping = asyncio.ensure_future(server.stop(grace + _STATUS_MARGIN))
        done, _ = await asyncio.wait({stopping}, timeout=grace)
        if not done:
            for response in self.store.running_here():
                response.cancel()
                response.stop_generation()
            for response in self.store.shared_here():
                response.interrupt_readers(
                    ServerStopping(
                        "this replica is stopping; resume the response on another replica"
                    )
                )
        await stopping

    def _reloaders(self) -> list[tuple[str, Callable[[], Outcome]]]:
        """What SIGHUP reloads, keys first: a revocation must never wait on another file."""
        found: dict[str, Callable[[], Outcome] | None] = {
            "keys": self.authenticator.reload if self.authenticator is not None else None,
            "tls": self.tls.reload if self.tls is not None else None,
            "policy": self.policies.reload if self.policies.source is not None else None,
            "routing": self.routing.reload if self.routing is not None else None,
        }
        return [(name, found[name]) for name in RELOAD_FILES if found[name] is not None]  # type: ignore[misc]

    def reload(self) -> dict[str, Outcome]:
        """SIGHUP: each file reloads on its own; one that fails keeps its version
        in force and is counted, and never stops the files after it."""
        outcomes: dict[str, Outcome] = {}
        for name, reload in self._reloaders():
            try:
                outcome = reload()
            except Exception as error:  # a bug in one reload must not skip the others
                log.error(
                    "%s reload failed, keeping the version in force: %s", name, one_line(error)
                )
                outcome = Outcome.FAILED
            self.metrics.config_reloads.labels(file=name, result=outcome.value).inc()
            if outcome in (Outcome.OK, Outcome.UNCHANGED):
                self.metrics.config_last_good_load.labels(file=name).set_to_current_time()
            outcomes[name] = outcome
        log.info(
            "reload finished: %s", ", ".join(f"{name} {o.value}" for name, o in outcomes.items())
        )
        return outcomes

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: Config, config_file: Path | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then drains and returns (the process exits 0)."""
    server = TokenwireServer(config, config_file=config_file)
    port = await server.start()
    # Everything loaded so far lives as long as the process: keep it out of the
    # cyclic collector's full passes, which otherwise walk it again and again
    # (the collector had about 7 % of the samples in a 1,000-stream profile).
    # Every chunk allocates a few short-lived objects that reference counting
    # frees; collecting the young generation every 20,000 allocations instead
    # of 700 took per-message cost at 64 streams from 40.7 to 38.7 µs.
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    # Signals are handled before the server says it serves: whoever reads that
    # line may send SIGHUP at once, and its default action ends the process.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    host = config.network.host
    print(f"tokenwire serving on {host}:{port}", flush=True)
    if server.metrics_port is not None:
        print(
            f"metrics on http://{config.observability.metrics_host}:{server.metrics_port}/metrics",
            flush=True,
        )
    if server.health_port is not None:
        print(f"health on {host}:{server.health_port} (plaintext, health only)", flush=True)
    policy = server.policies.current
    log.info(
        "serving on %s:%d (default model %s, policy %s v%s, audit %s)",
        host,
        port,
        server.registry.default_model,
        policy.policy_id,
        policy.policy_version,
        config.audit.audit_path,
    )
    await stop.wait()
    log.info("draining: grace period %.1fs", config.network.grace_period)
    await server.drain()
    log.info("stopped")
