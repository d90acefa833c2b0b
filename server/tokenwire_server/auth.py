"""Who is calling: API keys (stored only as SHA-256 hashes) or a verified mTLS identity.

The keys file maps key hashes to tenants:

    keys:
      - tenant: acme
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        name: ci            # optional, for operators
      - tenant: acme
        sha256: c97ace4c8fef2cee8fa0f3c9f52aab18dbd4f42438afe362ffb8f75ce4c04b84
        name: alice
        role: reviewer      # optional: `reviewer` may also decide acme's reviews

A key without `role` calls the service as before; `role: reviewer` (or
`roles: [reviewer]`) lets it list and decide its tenant's reviews too.

`tokenwire keys hash` prints the hash of a key read from stdin. Presented
keys are hashed and compared with every entry in constant time, so neither
the file nor the timing tells anything about a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from tokenwire_server.reload import FileLoader, FileProblem, Outcome

log = logging.getLogger(__name__)


class KeysFileError(FileProblem):
    """The keys file cannot be used; the message says where."""


#: Roles a key can have besides calling the service.
REVIEWER = "reviewer"
ROLES = frozenset({REVIEWER})


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: str
    digest: bytes
    name: str
    roles: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        """Who this key is in audit rows: its name, else the start of its hash."""
        return self.name or f"key:{self.digest.hex()[:12]}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _entries(path: str) -> list[object]:
    source = Path(path)
    try:
        raw = source.read_text(encoding="utf-8")
        spec = tomllib.loads(raw) if source.suffix == ".toml" else yaml.safe_load(raw)
    except OSError as error:
        raise KeysFileError(f"{path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise KeysFileError(f"{path}: {error}") from None
    entries = spec.get("keys") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: expected a `keys` list")
    return entries


def _digest(entry: dict[str, object]) -> bytes:
    digest = entry.get("sha256")
    try:
        value = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        value = b""
    return value if len(value) == 32 else b""


#: A key hash anywhere in a file's text: 64 hex digits, not part of a longer run.
_HEX_DIGEST = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
#: Where a YAML or TOML comment starts: a `#` at the start of a line or after a space.
_COMMENT = re.compile(r"(?:^|(?<=\s))#")


def listed_digests(path: str) -> frozenset[bytes] | None:
    """The key hashes a keys file lists, read leniently: its entries' hashes
    when it parses (entries that are otherwise wrong included), else every
    hash in its text outside comments (a syntax error must not keep alive a
    key the same edit deleted); None only when the file cannot be read."""
    try:
        entries = _entries(path)
    except KeysFileError:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return _digests_in_text(text)
    return frozenset(_digest(e) for e in entries if isinstance(e, dict)) - {b""}


def _digests_in_text(text: str) -> frozenset[bytes]:
    """Hashes outside comments, so a key commented out to revoke it stays revoked."""
    found: set[bytes] = set()
    for line in text.splitlines():
        comment = _COMMENT.search(line)
        live = line if comment is None else line[: comment.start()]
        found.update(bytes.fromhex(digest) for digest in _HEX_DIGEST.findall(live))
    return frozenset(found)


def load_keys(path: str) -> tuple[KeyEntry, ...]:
    entries = _entries(path)
    keys: list[KeyEntry] = []
    for index, entry in enumerate(entries):
        where = f"{path}: keys[{index}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected a table")
        tenant, value = entry.get("tenant"), _digest(entry)
        if not isinstance(tenant, str) or not tenant:
            raise KeysFileError(f"{where}: tenant must be a non-empty string")
        if not value:
            raise KeysFileError(f"{where}: sha256 must be 64 hex digits (tokenwire keys hash)")
        if any(k.digest == value for k in keys):
            raise KeysFileError(f"{where}: the same key is listed twice")
        keys.append(KeyEntry(tenant, value, str(entry.get("name", "")), _roles(entry, where)))
    return tuple(keys)


def _roles(entry: dict[str, object], where: str) -> frozenset[str]:
    """`role: reviewer` or `roles: [reviewer]`; none by default."""
    if "role" in entry and "roles" in entry:
        raise KeysFileError(f"{where}: give role or roles, not both")
    raw = entry.get("roles", [entry["role"]] if "role" in entry else [])
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise KeysFileError(f"{where}: roles must be a list of role names")
    unknown = sorted(set(raw) - ROLES)
    if unknown:
        raise KeysFileError(
            f"{where}: unknown role {unknown[0]!r} (known: {', '.join(sorted(ROLES))})"
        )
    return frozenset(raw)


class Authenticator:
    """The keys currently in force; `reload` swaps them atomically (SIGHUP).

    A keys file that fails to load, for any reason, keeps the previous keys
    and says why in one log line; the first load raises a LoadError. A failed
    reload never widens access but still narrows it: a key in force that the
    file no longer lists is revoked even when another entry is wrong."""

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

    def identify(self, key: str) -> KeyEntry | None:
        """The entry of `key` (tenant, name, roles), compared like `tenant_for`."""
        presented = hashlib.sha256(key.encode()).digest()
        found: KeyEntry | None = None
        for entry in self._keys:  # no early exit: every call costs the same
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        return found

    def reload(self) -> Outcome:
        keys = self._loader.next(
            f"the previous {len(self._keys)} keys but those it no longer lists"
        )
        if keys is None:
            if self._loader.outcome is Outcome.FAILED:
                self._revoke_unlisted()
            return self._loader.outcome
        self._keys = keys
        log.info("keys reloaded: %d keys", len(keys))
        return Outcome.OK

    def _revoke_unlisted(self) -> None:
        listed = listed_digests(self.path)
        if listed is None:
            return
        kept = tuple(k for k in self._keys if k.digest in listed)
        if len(kept) < len(self._keys):
            log.warning(
                "keys file %s: %d keys in force are no longer listed and are revoked now; "
                "the other entries wait for a file that loads",
                self.path,
                len(self._keys) - len(kept),
            )
            self._keys = kept
            # The keys in force are no longer the file's: the next reload loads
            # it even when its bytes are the old version's again (restored).
            self._loader.forget()
