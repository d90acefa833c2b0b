"""Who is calling: API keys (stored only as SHA-256 hashes) or a verified mTLS identity.

The keys file maps key hashes to tenants:

    keys:
      - tenant: acme
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        name: ci            # optional, for operators

`tokenwire keys hash` prints the hash of a key read from stdin. Presented
keys are hashed and compared with every entry in constant time, so neither
the file nor the timing tells anything about a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from tokenwire_server.reload import FileLoader, Outcome

log = logging.getLogger(__name__)


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: str
    digest: bytes
    name: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str) -> tuple[KeyEntry, ...]:
    source = Path(path)
    try:
        raw = source.read_text(encoding="utf-8")
        spec = tomllib.loads(raw) if source.suffix == ".toml" else yaml.safe_load(raw)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise KeysFileError(f"{path}: {error}") from error
    entries = spec.get("keys") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: expected a `keys` list")
    keys = []
    for index, entry in enumerate(entries):
        where = f"{path}: keys[{index}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected a table")
        tenant, digest = entry.get("tenant"), entry.get("sha256")
        if not isinstance(tenant, str) or not tenant:
            raise KeysFileError(f"{where}: tenant must be a non-empty string")
        try:
            value = bytes.fromhex(str(digest))
        except ValueError:
            value = b""
        if len(value) != 32:
            raise KeysFileError(f"{where}: sha256 must be 64 hex digits (tokenwire keys hash)")
        keys.append(KeyEntry(tenant, value, str(entry.get("name", ""))))
    return tuple(keys)


class Authenticator:
    """The keys currently in force; `reload` swaps them atomically (SIGHUP).

    A keys file that fails to load, for any reason, keeps the previous keys
    and says why in one log line; the first load raises a LoadError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._loader = FileLoader("keys file", path, (path,), lambda: load_keys(path))
        self._keys = self._loader.first()

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(k.tenant for k in self._keys)

    def tenant_for(self, key: str) -> str | None:
        presented = hashlib.sha256(key.encode()).digest()
        found: str | None = None
        for entry in self._keys:  # no early exit: every call costs the same
            if hmac.compare_digest(presented, entry.digest):
                found = entry.tenant
        return found

    def reload(self) -> Outcome:
        keys = self._loader.next(f"the previous {len(self._keys)} keys")
        if keys is None:
            return self._loader.outcome
        self._keys = keys
        log.info("keys reloaded: %d keys", len(keys))
        return Outcome.OK
