"""Which validators a response gets: `[[validators]]` tables of the server's config file.

```toml
[[validators]]
name = "compliance"            # the check is `validator:compliance`
address = "127.0.0.1:7070"     # gRPC target of a tokenwire.v1.ValidatorService
tls_ca = ""                    # PEM CA of the validator's certificate: TLS when set
tls = false                    # TLS with the system's trusted roots
tls_server_name = ""           # name to check the certificate against (default: the host)
mode = "validate"              # validate: the final payload; stream: released text in windows
timeout = 1.0                  # seconds for a verdict (after the final payload / the end)
on_error = "fail_closed"       # down, crashed, timed out or garbage: fail_closed | pass | escalate
on_fail = "block"              # FAIL: block (refusal text) | retract (from the failing window)
release_gate = false           # release no text before its verdict (validate mode)
window_chars = 512             # stream mode: characters of released text per window
send_messages = false          # also send the request's conversation
[validators.match]             # all given must hold; nothing given matches every response
models = ["tokenwire-sim"]
tenants = ["acme"]
labels = { risk = "high" }
```

`parse_validators` reads them from the parsed file and refuses a bad entry
with the file, the entry and the field, like every other config problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from tokenwire_server.reload import FileProblem

#: Longest timeout a validator may have: it bounds how long `Completed` can wait.
MAX_TIMEOUT = 60.0
MAX_WINDOW_CHARS = 65536
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ValidatorConfigError(FileProblem):
    """A `[[validators]]` entry cannot be used; the message names file, entry and field."""


class Mode(StrEnum):
    #: `Validate` on the final payload.
    VALIDATE = "validate"
    #: `ValidateStream` on the released text while it is released.
    STREAM = "stream"


class OnError(StrEnum):
    """What a validator that gives no verdict (down, crashed, timed out, garbage) means."""

    FAIL_CLOSED = "fail_closed"
    PASS = "pass"
    ESCALATE = "escalate"


class OnFail(StrEnum):
    """What a FAIL does to the response."""

    #: The final payload is the policy's refusal text.
    BLOCK = "block"
    #: The final payload is the text before the first failing window (stream
    #: mode; in validate mode, before the first violation's start).
    RETRACT = "retract"


@dataclass(frozen=True, slots=True)
class Match:
    """Every dimension given must hold; an empty one matches anything."""

    models: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()

    def applies(self, model: str, tenant: str, labels: Mapping[str, str]) -> bool:
        if self.models and model not in self.models:
            return False
        if self.tenants and tenant not in self.tenants:
            return False
        return all(labels.get(key) == value for key, value in self.labels)


@dataclass(frozen=True, slots=True)
class ValidatorConfig:
    name: str
    address: str
    mode: Mode = Mode.VALIDATE
    timeout: float = 1.0
    on_error: OnError = OnError.FAIL_CLOSED
    on_fail: OnFail = OnFail.BLOCK
    release_gate: bool = False
    window_chars: int = 512
    send_messages: bool = False
    tls: bool = False
    tls_ca: str = ""
    tls_server_name: str = ""
    match: Match = field(default_factory=Match)

    @property
    def check_name(self) -> str:
        return f"validator:{self.name}"

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca)


_FIELDS = {
    "name",
    "address",
    "mode",
    "timeout",
    "on_error",
    "on_fail",
    "release_gate",
    "window_chars",
    "send_messages",
    "tls",
    "tls_ca",
    "tls_server_name",
    "match",
}
_MATCH_FIELDS = {"models", "tenants", "labels"}


def _string(value: object) -> bool:
    return isinstance(value, str)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


class _Entry:
    """Reads one table, collecting every problem with its field."""

    def __init__(self, table: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self.table = table
        self.where = where
        self.problems = problems

    def bad(self, key: str, text: str) -> None:
        self.problems.append(f"{self.where}.{key}: {text}")

    def text(self, key: str, default: str = "", required: bool = False) -> str:
        if key not in self.table:
            if required:
                self.bad(key, "is required")
            return default
        value = self.table[key]
        if not _string(value) or (required and not value):
            self.bad(key, f"must be a non-empty string, not {value!r}")
            return default
        return str(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            self.bad(key, f"must be true or false, not {value!r}")
            return default
        return value

    def choice(self, key: str, kind: type[StrEnum], default: StrEnum) -> Any:
        value = self.table.get(key, default.value)
        try:
            return kind(value)
        except ValueError:
            allowed = " | ".join(member.value for member in kind)
            self.bad(key, f"must be {allowed}, not {value!r}")
            return default


def _match(raw: object, entry: _Entry) -> Match:
    if raw is None:
        return Match()
    if not isinstance(raw, dict):
        entry.bad("match", "must be a table (models, tenants, labels)")
        return Match()
    for key in sorted(set(raw) - _MATCH_FIELDS):
        entry.bad(f"match.{key}", "unknown key (known: models, tenants, labels)")
    models, tenants = raw.get("models", []), raw.get("tenants", [])
    if not _strings(models):
        entry.bad("match.models", "must be a list of model names")
        models = []
    if not _strings(tenants):
        entry.bad("match.tenants", "must be a list of tenants")
        tenants = []
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        entry.bad("match.labels", "must be a table of label = value strings")
        labels = {}
    return Match(frozenset(models), frozenset(tenants), tuple(sorted(labels.items())))


def _one(
    table: Mapping[str, Any], where: str, base: Path | None, problems: list[str]
) -> ValidatorConfig:
    entry = _Entry(table, where, problems)
    for key in sorted(set(table) - _FIELDS):
        entry.bad(key, f"unknown key (known: {', '.join(sorted(_FIELDS))})")
    name = entry.text("name", required=True)
    if name and not _NAME.fullmatch(name):
        entry.bad("name", "letters, digits, '_', '.' or '-', at most 64, starting alphanumeric")
    address = entry.text("address", required=True)
    mode: Mode = entry.choice("mode", Mode, Mode.VALIDATE)
    timeout = table.get("timeout", 1.0)
    if not _number(timeout) or not 0 < timeout <= MAX_TIMEOUT or not math.isfinite(timeout):
        entry.bad("timeout", f"must be a number of seconds > 0 and <= {MAX_TIMEOUT:g}")
        timeout = 1.0
    on_error: OnError = entry.choice("on_error", OnError, OnError.FAIL_CLOSED)
    on_fail: OnFail = entry.choice(
        "on_fail", OnFail, OnFail.RETRACT if mode is Mode.STREAM else OnFail.BLOCK
    )
    release_gate = entry.flag("release_gate")
    if release_gate and mode is Mode.STREAM:
        entry.bad("release_gate", "needs mode = validate (stream mode judges released text)")
    window = table.get("window_chars", 512)
    if (
        not isinstance(window, int)
        or isinstance(window, bool)
        or not 1 <= window <= MAX_WINDOW_CHARS
    ):
        entry.bad("window_chars", f"must be an integer from 1 to {MAX_WINDOW_CHARS}")
        window = 512
    tls_ca = entry.text("tls_ca")
    if tls_ca:
        path = Path(tls_ca) if base is None or Path(tls_ca).is_absolute() else base / tls_ca
        if not path.is_file():
            entry.bad("tls_ca", f"no file at {path}")
        tls_ca = str(path)
    return ValidatorConfig(
        name=name,
        address=address,
        mode=mode,
        timeout=float(timeout),
        on_error=on_error,
        on_fail=on_fail,
        release_gate=release_gate,
        window_chars=int(window),
        send_messages=entry.flag("send_messages"),
        tls=entry.flag("tls"),
        tls_ca=tls_ca,
        tls_server_name=entry.text("tls_server_name"),
        match=_match(table.get("match"), entry),
    )


def parse_validators(
    document: Mapping[str, Any], source: str = "config file", base_dir: Path | None = None
) -> tuple[ValidatorConfig, ...]:
    """The `[[validators]]` tables of a parsed config file, in file order.

    `source` names the file in messages; a relative `tls_ca` is read from
    `base_dir` (the file's directory; the working directory when None).
    Every problem is reported at once, each as
    `SOURCE: validators[INDEX] (NAME).FIELD: what is wrong`, in one
    ValidatorConfigError; nothing is returned unless every entry is good.
    """
    raw = document.get("validators", [])
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ValidatorConfigError(f"{source}: validators must be [[validators]] tables")
    base = base_dir
    problems: list[str] = []
    configs: list[ValidatorConfig] = []
    for index, item in enumerate(raw):
        label = item.get("name")
        where = f"{source}: validators[{index}]" + (
            f" ({label})" if isinstance(label, str) and label else ""
        )
        configs.append(_one(item, where, base, problems))
    names = [c.name for c in configs if c.name]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{source}: validators: the name {name!r} is used twice")
    if problems:
        raise ValidatorConfigError("; ".join(problems))
    return tuple(configs)


def matching(
    configs: Sequence[ValidatorConfig], model: str, tenant: str, labels: Mapping[str, str]
) -> tuple[ValidatorConfig, ...]:
    """The validators a response of `model` for `tenant` with `labels` gets."""
    return tuple(c for c in configs if c.match.applies(model, tenant, labels))
