"""Server configuration: one frozen dataclass tree.

Every leaf has one name used three ways, so an operator never has to guess:
the CLI flag ``--grace-period``, the environment variable
``TOKENWIRE_GRACE_PERIOD`` and the key ``grace_period`` in its section of an
optional TOML file. Precedence: CLI flag, then environment, then file, then
the default below.

Why one module: the dataclass tree is the one description of every setting,
and flags, environment and file are derived from it here; split, a new
setting would need edits in several files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenwire_server.reload import FileProblem
from tokenwire_server.validators.config import (
    ValidatorConfig,
    ValidatorConfigError,
    parse_validators,
)

ENV_PREFIX = "TOKENWIRE_"


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NetworkConfig:
    host: str = _setting("127.0.0.1", "address to bind; 0.0.0.0 or [::] to serve other hosts")
    port: int = _setting(50051, "port to bind; 0 picks a free port (printed at start)")
    grace_period: float = _setting(
        10.0, "seconds in-flight calls get to finish after SIGTERM/SIGINT"
    )
    drain_delay: float = _setting(
        0.0,
        "seconds between health turning NOT_SERVING and refusing new calls, so load "
        "balancers see the change first",
    )
    max_message_bytes: int = _setting(4 * 1024 * 1024, "largest request message accepted")
    tls_cert: str = _setting("", "PEM certificate chain; with tls_key, the port serves TLS only")
    tls_key: str = _setting("", "PEM private key of tls_cert")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    health_port: int = _setting(
        -1,
        "plaintext port serving only grpc.health.v1, for probes that cannot speak TLS "
        "(kubelet); -1 off, 0 picks a free port",
    )


@dataclass(frozen=True)
class ModelConfig:
    default_model: str = _setting("tokenwire-sim", "model used when a request names none")


@dataclass(frozen=True)
class DeadlineConfig:
    default_deadline: float = _setting(
        120.0, "seconds a call may run when the caller sets no deadline"
    )
    max_deadline: float = _setting(600.0, "upper bound on any call's run time, in seconds")
    stall_timeout: float = _setting(
        30.0, "seconds without a new token before a generation is failed as stalled"
    )


@dataclass(frozen=True)
class LimitsConfig:
    max_tokens_cap: int = _setting(4096, "largest params.max_tokens accepted")
    default_max_tokens: int = _setting(512, "max_tokens when a request sets 0")
    max_prompt_bytes: int = _setting(256 * 1024, "largest total UTF-8 size of all message contents")
    max_messages: int = _setting(256, "most chat messages in one request")
    max_labels: int = _setting(32, "most labels in one request")


@dataclass(frozen=True)
class DeliveryConfig:
    auto_short_max_tokens: int = _setting(
        32, "AUTO sends the answer whole when max_tokens is at most this"
    )
    auto_buffer_window: float = _setting(
        0.05, "AUTO sends the answer whole when generation ends within these seconds"
    )
    default_max_tokens_per_chunk: int = _setting(32, "coalescing bound when a request sets none")
    max_tokens_per_chunk_limit: int = _setting(1024, "largest chunking.max_tokens_per_chunk")
    max_chunk_delay_limit: float = _setting(
        1.0, "largest chunking.max_delay a request may ask for, in seconds"
    )
    heartbeat_interval: float = _setting(
        10.0, "seconds of silence on a stream before a Heartbeat is sent"
    )
    max_pending_chars: int = _setting(
        65536, "released text a stream may hold for a slow reader before generation waits"
    )


@dataclass(frozen=True)
class SimulatorConfig:
    sim_time_to_first_token: float = _setting(0.02, "simulator: seconds before the first token")
    sim_inter_token_delay: float = _setting(0.005, "simulator: seconds between tokens")
    sim_answer_tokens: int = _setting(64, "simulator: tokens in a tokenwire-sim answer")
    sim_echo_token_chars: int = _setting(4, "simulator: characters per token of the echo model")


@dataclass(frozen=True)
class GovernanceConfig:
    policy: str = _setting(
        "pass-through",
        "policy file (.yaml/.yml/.toml), builtin:default, or pass-through; reloaded on SIGHUP",
    )


@dataclass(frozen=True)
class ResumeConfig:
    resumable_by_default: bool = _setting(
        False, "treat every stream as resumable, as if it set `resumable`"
    )
    detach_window: float = _setting(
        30.0, "seconds a resumable response keeps generating with no reader attached"
    )
    retention: float = _setting(
        600.0, "seconds an ended response stays available for resume and idempotent retries"
    )
    store_max_responses: int = _setting(10000, "most ended responses kept in memory")
    store_max_bytes: int = _setting(
        4 * 1024 * 1024, "most memory (bytes) ended responses take in the store, packed"
    )
    store: str = _setting(
        "memory", "memory, or redis://HOST:PORT/DB to share responses between replicas"
    )
    lease_seconds: float = _setting(
        3.0,
        "with Redis: how long a replica's silence lasts before another takes its responses over",
    )


@dataclass(frozen=True)
class AuthConfig:
    auth_keys_file: str = _setting(
        "", "YAML/TOML file of API-key hashes and their tenants; set, every call needs a key"
    )
    auth_mtls: bool = _setting(
        False, "accept a verified client certificate (its first SAN) as the tenant"
    )
    auth_health_and_reflection: bool = _setting(
        False,
        "require credentials for health checking and reflection too (off: open for probes)",
    )


@dataclass(frozen=True)
class QuotaConfig:
    max_concurrent_calls: int = _setting(
        1000, "calls served at once, server-wide; more wait briefly, then RESOURCE_EXHAUSTED"
    )
    admission_wait: float = _setting(
        0.1, "seconds a call over max_concurrent_calls may wait for a slot"
    )
    tenant_max_concurrent_calls: int = _setting(0, "calls at once per tenant (0: no limit)")
    tenant_tokens_per_minute: int = _setting(
        0, "generated tokens per minute per tenant, a token bucket (0: no limit)"
    )
    keepalive_time: float = _setting(30.0, "seconds between server keepalive pings")
    keepalive_timeout: float = _setting(10.0, "seconds a keepalive ping may go unanswered")
    min_client_ping_interval: float = _setting(
        10.0, "shortest interval between client pings the server tolerates"
    )
    max_connection_idle: float = _setting(
        600.0, "seconds an idle connection is kept before the server closes it (GOAWAY)"
    )
    max_connection_age: float = _setting(
        1800.0, "seconds before a connection is asked to reconnect, so meshes rebalance"
    )
    max_connection_age_grace: float = _setting(
        600.0, "seconds in-flight calls keep after max_connection_age (resumable streams resume)"
    )


@dataclass(frozen=True)
class AuditConfig:
    audit_path: str = _setting(
        "tokenwire-audit.sqlite3", "SQLite file of the audit trail (':memory:' keeps it in memory)"
    )


@dataclass(frozen=True)
class ReviewConfig:
    review_path: str = _setting(
        "",
        "SQLite file of human reviews (empty: beside audit_path, or in memory with it); "
        "with a redis:// store, reviews are kept in that Redis",
    )


@dataclass(frozen=True)
class BackendConfig:
    backend: str = _setting(
        "simulator", "embedded backend beside the upstreams: simulator or llama"
    )
    upstream_url: str = _setting(
        "", "shortcut for one OpenAI-compatible upstream, e.g. http://127.0.0.1:8000/v1"
    )
    upstream_model: str = _setting(
        "", "model name of the upstream_url route (as callers and the upstream name it)"
    )
    upstream_api_key_env: str = _setting(
        "", "environment variable holding the upstream_url route's API key"
    )
    llama_model_path: str = _setting(
        "", "GGUF file for --backend llama (default: the packaged Gemma 3 270M)"
    )


@dataclass(frozen=True)
class UpstreamConfig:
    """One OpenAI-compatible route, from `[[upstreams]]` in the config file."""

    name: str
    base_url: str
    model: str = ""
    upstream_model: str = ""
    api_key_env: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_retries: int = 2
    retry_backoff: float = 0.2
    stream: bool = True
    fallback: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObservabilityConfig:
    metrics_port: int = _setting(
        -1, "port for Prometheus /metrics (0 picks a free one; -1, the default, serves none)"
    )
    metrics_host: str = _setting("127.0.0.1", "address the /metrics endpoint binds")


@dataclass(frozen=True)
class LoggingConfig:
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("json", "json (one object per line) or text")
    log_text: bool = _setting(
        False, "put prompt and output text in logs (off: logs never carry model text)"
    )


@dataclass(frozen=True)
class Config:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    backends: BackendConfig = field(default_factory=BackendConfig)
    governance: GovernanceConfig = field(default_factory=GovernanceConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    reviews: ReviewConfig = field(default_factory=ReviewConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Routes to OpenAI-compatible upstreams (`[[upstreams]]` tables in the file).
    upstreams: tuple[UpstreamConfig, ...] = ()
    #: The callers' validators (`[[validators]]` tables in the file; validators/config.py).
    validators: tuple[ValidatorConfig, ...] = ()


class ConfigError(FileProblem):
    """A setting could not be read; the message names the setting and its source."""


#: Arrays of tables in the file, not sections of settings.
_TABLES = frozenset({"upstreams", "validators"})


def _sections() -> list[tuple[str, type[Any]]]:
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config) if f.name not in _TABLES]


def _leaves(section_type: type[Any]) -> list[tuple[dataclasses.Field[Any], type[Any]]]:
    hints = typing.get_type_hints(section_type)
    return [(f, hints[f.name]) for f in dataclasses.fields(section_type)]


def _coerce(raw: object, kind: type[Any], where: str) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in {"1", "true", "yes", "on"}
        if kind is int and isinstance(raw, float):
            raise ValueError("not an integer")
        if kind is str and not isinstance(raw, str):
            raise ValueError("not a string")
        value = kind(raw)
        if kind is float and not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {raw!r} as {kind.__name__}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; unset flags stay None so lower layers show through."""
    for section_name, section_type in _sections():
        group = parser.add_argument_group(section_name)
        for leaf, kind in _leaves(section_type):
            flag = "--" + leaf.name.replace("_", "-")
            env = ENV_PREFIX + leaf.name.upper()
            group.add_argument(
                flag,
                dest=leaf.name,
                type=str,
                default=None,
                metavar=kind.__name__.upper(),
                help=f"{leaf.metadata['help']} (env {env}; default {leaf.default!r})",
            )


def load_config(
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> Config:
    """Builds the Config from CLI values, environment and an optional TOML file."""
    cli = cli or {}
    env = os.environ if env is None else env
    from_file = read_file_settings(file) if file is not None else FileSettings({}, (), ())
    sections: dict[str, Any] = {}
    for section_name, section_type in _sections():
        values = dict(from_file.sections.get(section_name, {}))
        for leaf, kind in _leaves(section_type):
            env_name = ENV_PREFIX + leaf.name.upper()
            if cli.get(leaf.name) is not None:
                values[leaf.name] = _coerce(
                    cli[leaf.name], kind, "--" + leaf.name.replace("_", "-")
                )
            elif env_name in env:
                values[leaf.name] = _coerce(env[env_name], kind, env_name)
        sections[section_name] = section_type(**values)
    config = Config(**sections, upstreams=from_file.upstreams, validators=from_file.validators)
    _check(config)
    return config


@dataclass(frozen=True)
class FileSettings:
    """What a config file sets, each value checked and converted."""

    #: Section name -> the settings the file gives in it.
    sections: dict[str, dict[str, Any]]
    upstreams: tuple[UpstreamConfig, ...]
    validators: tuple[ValidatorConfig, ...]


def read_file_settings(file: Path) -> FileSettings:
    """Reads and checks a config file; a ConfigError names the first bad setting."""
    raw = read_config_file(file)
    known_sections = {name for name, _ in _sections()} | _TABLES
    for unknown in sorted(set(raw) - known_sections):
        raise ConfigError(f"config file {file}: unknown section [{unknown}]")
    sections: dict[str, dict[str, Any]] = {}
    for section_name, section_type in _sections():
        table = raw.get(section_name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config file {file}: [{section_name}] must be a table")
        known = {leaf.name for leaf, _ in _leaves(section_type)}
        for unknown in sorted(set(table) - known):
            raise ConfigError(f"config file {file}: unknown key {section_name}.{unknown}")
        sections[section_name] = {
            leaf.name: _coerce(table[leaf.name], kind, f"{file}: {section_name}.{leaf.name}")
            for leaf, kind in _leaves(section_type)
            if leaf.name in table
        }
    try:
        validators = parse_validators(raw, source=f"config file {file}", base_dir=file.parent)
    except ValidatorConfigError as error:
        raise ConfigError(str(error)) from None
    return FileSettings(sections, _upstreams(raw.get("upstreams", []), file), validators)


def read_config_file(file: Path) -> dict[str, Any]:
    """The TOML file's tables, or a ConfigError of one line naming the file."""
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {file}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file}: {exc}") from None


def check_routes(config: Config, routes: tuple[UpstreamConfig, ...], file: Path) -> None:
    """Raises a ConfigError when `routes` cannot replace the config's routes."""
    problems = route_problems(all_upstreams(replace(config, upstreams=routes)))
    if problems:
        raise ConfigError(f"config file {file}: {'; '.join(problems)}")


def _upstreams(raw: object, file: Path | None) -> tuple[UpstreamConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(f"config file {file}: upstreams must be [[upstreams]] tables")
    hints = typing.get_type_hints(UpstreamConfig)
    routes = []
    for index, item in enumerate(raw):
        where = f"config file {file}: upstreams[{index}]"
        unknown = set(item) - set(hints)
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]}")
        if not item.get("name") or not item.get("base_url"):
            raise ConfigError(f"{where}: name and base_url are required")
        values = dict(item)
        fallback = values.get("fallback", [])
        if not isinstance(fallback, list) or not all(isinstance(f, str) for f in fallback):
            raise ConfigError(f"{where}: fallback must be a list of upstream names")
        values["fallback"] = tuple(fallback)
        for key, value in values.items():
            kind = hints[key]
            if key != "fallback" and not _is_a(value, kind):
                name = getattr(kind, "__name__", str(kind))
                raise ConfigError(f"{where}: {key} must be {name}, not {value!r}")
            if kind in (int, float) and not 0 <= value < math.inf:
                raise ConfigError(f"{where}: {key} must be a finite number >= 0, not {value!r}")
        try:
            routes.append(UpstreamConfig(**values))
        except TypeError as error:
            raise ConfigError(f"{where}: {error}") from error
    return tuple(routes)


def _is_a(value: object, kind: object) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _check(config: Config) -> None:
    problems: list[str] = []
    if not 0 <= config.network.port <= 65535:
        problems.append("port must be 0..65535")
    if config.deadlines.default_deadline <= 0 or config.deadlines.max_deadline <= 0:
        problems.append("deadlines must be positive")
    if config.deadlines.default_deadline > config.deadlines.max_deadline:
        problems.append("default_deadline must not exceed max_deadline")
    if config.limits.default_max_tokens > config.limits.max_tokens_cap:
        problems.append("default_max_tokens must not exceed max_tokens_cap")
    if config.delivery.default_max_tokens_per_chunk > config.delivery.max_tokens_per_chunk_limit:
        problems.append("default_max_tokens_per_chunk must not exceed max_tokens_per_chunk_limit")
    if config.delivery.heartbeat_interval <= 0:
        problems.append("heartbeat_interval must be positive")
    if config.resume.store != "memory" and not config.resume.store.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        problems.append("store must be memory or a redis:// URL")
    net = config.network
    if bool(net.tls_cert) != bool(net.tls_key):
        problems.append("tls_cert and tls_key go together")
    if net.tls_client_ca and not net.tls_cert:
        problems.append("tls_client_ca needs tls_cert and tls_key")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(net, name)
        if path and not Path(path).is_file():
            problems.append(f"{name}: no file at {path}")
    if config.auth.auth_mtls and not net.tls_client_ca:
        problems.append("auth_mtls needs tls_client_ca")
    if config.auth.auth_keys_file and not Path(config.auth.auth_keys_file).is_file():
        problems.append(f"auth_keys_file: no file at {config.auth.auth_keys_file}")
    if config.logging.log_format not in ("json", "text"):
        problems.append("log_format must be json or text")
    if config.logging.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("log_level must be DEBUG, INFO, WARNING or ERROR")
    if config.backends.backend not in ("simulator", "llama"):
        problems.append("backend must be simulator or llama")
    problems.extend(route_problems(all_upstreams(config)))
    if config.simulator.sim_echo_token_chars < 1:
        problems.append("sim_echo_token_chars must be at least 1")
    if problems:
        raise ConfigError("; ".join(problems))


def route_problems(routes: Sequence[UpstreamConfig]) -> list[str]:
    problems: list[str] = []
    names = [u.name for u in routes]
    if len(names) != len(set(names)):
        problems.append("upstream names must be unique")
    for upstream in routes:
        for name in upstream.fallback:
            if name not in names or name == upstream.name:
                problems.append(f"upstream {upstream.name}: unknown fallback {name!r}")
    return problems


def all_upstreams(config: Config) -> tuple[UpstreamConfig, ...]:
    """The file's routes plus the `upstream_url` shortcut, if given."""
    b = config.backends
    if not b.upstream_url:
        return config.upstreams
    shortcut = UpstreamConfig(
        name="upstream",
        base_url=b.upstream_url,
        model=b.upstream_model or "upstream",
        upstream_model=b.upstream_model,
        api_key_env=b.upstream_api_key_env,
    )
    return (*config.upstreams, shortcut)


def setting_names() -> Sequence[str]:
    """All leaf names, for docs and tests."""
    return [leaf.name for _, section in _sections() for leaf, _ in _leaves(section)]
