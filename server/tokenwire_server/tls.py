"""The server's TLS material: read and checked whole at start, re-read on SIGHUP.

`load_tls` reads the certificate chain, its private key and the optional
client CA bundle, and checks them the way a handshake would (each file is
PEM of the right kind, the key belongs to the chain's first certificate, the
CA bundle parses) with the standard library's OpenSSL, so a bad file is
refused at start or at reload instead of failing the first handshake.

`TlsCredentials` hands grpc dynamic credentials: grpc core asks it for new
material before each new connection's handshake, and it answers with the
last material that loaded (once; grpc keeps it), so established connections
keep their session while new ones use the new certificate.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from tokenwire_server.config import NetworkConfig
from tokenwire_server.reload import FileLoader, FileProblem, Outcome

log = logging.getLogger("tokenwire_server.reload")


class TlsError(FileProblem):
    """A TLS file cannot be used; the message names the setting, the file and the problem."""


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key.
    raise _EncryptedKey


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    key: bytes
    chain: bytes
    client_ca: bytes | None

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.key, self.chain, self.client_ca or b""):
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.chain)], root_certificates=self.client_ca
        )


def tls_paths(net: NetworkConfig) -> tuple[str, ...]:
    return tuple(p for p in (net.tls_cert, net.tls_key, net.tls_client_ca) if p)


def _read(setting: str, path: str, marker: bytes, kind: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"{setting}: {path}: {error.strerror or error}") from None
    if marker not in data:
        raise TlsError(f"{setting}: {path}: no PEM {kind} in the file")
    return data


def _check_certificates(setting: str, path: str, data: bytes, kind: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as error:
        raise TlsError(f"{setting}: {path}: not a readable PEM {kind} ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "not ASCII text"
    reason = getattr(error, "reason", None)
    return str(reason) if reason else str(error).split(" (_ssl.c")[0]


def load_tls(net: NetworkConfig) -> TlsMaterial:
    """Reads and checks the TLS files `net` names; raises TlsError naming the bad one."""
    chain = _read("tls_cert", net.tls_cert, b"-----BEGIN CERTIFICATE-----", "certificate")
    key = _read("tls_key", net.tls_key, b"PRIVATE KEY-----", "private key")
    client_ca = None
    if net.tls_client_ca:
        client_ca = _read(
            "tls_client_ca", net.tls_client_ca, b"-----BEGIN CERTIFICATE-----", "CA certificate"
        )
        _check_certificates("tls_client_ca", net.tls_client_ca, client_ca, "CA bundle")
    _check_certificates("tls_cert", net.tls_cert, chain, "certificate chain")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")  # judge the files, not OpenSSL's key-size policy
    try:
        context.load_cert_chain(net.tls_cert, net.tls_key, password=_no_password)
    except _EncryptedKey:
        raise TlsError(
            f"tls_key: {net.tls_key}: the private key is encrypted; grpc needs it unencrypted"
        ) from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"tls_key: {net.tls_key}: does not belong to the first certificate "
                f"of tls_cert {net.tls_cert}"
            ) from None
        raise TlsError(
            f"tls_key: {net.tls_key}: not a readable PEM private key ({_reason(error)})"
        ) from None
    except OSError as error:
        raise TlsError(f"tls_cert/tls_key: {error.strerror or error}") from None
    # OpenSSL read the files by name: make sure they are the bytes checked above.
    for setting, path, data in (("tls_cert", net.tls_cert, chain), ("tls_key", net.tls_key, key)):
        if _read(setting, path, b"", "") != data:
            raise TlsError(f"{setting}: {path}: changed while being read; reload again")
    return TlsMaterial(key=key, chain=chain, client_ca=client_ca)


class TlsCredentials:
    """Server credentials whose certificate, key and client CA can be swapped.

    Constructing one loads and checks the files (a LoadError of one line when
    one is missing or wrong, so the server refuses to start); `reload` re-reads
    them on SIGHUP and keeps the material in force when the new files fail."""

    def __init__(self, net: NetworkConfig) -> None:
        self._net = net
        self._loader = FileLoader("tls", net.tls_cert, tls_paths(net), lambda: load_tls(net))
        self.current = self._loader.first()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self._fetch,  # type: ignore[arg-type]  # grpc accepts None: "unchanged"
            require_client_authentication=self.current.client_ca is not None,
        )

    def reload(self) -> Outcome:
        material = self._loader.next(f"certificate {self.current.fingerprint[:16]}")
        if material is None:
            return self._loader.outcome
        self.current = material
        self._pending = material.configuration()
        log.info("tls reloaded: certificate %s for new connections", material.fingerprint[:16])
        return Outcome.OK

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc core before each handshake: new material once, then
        # None for "unchanged" (grpc keeps what it was given last).
        pending, self._pending = self._pending, None
        return pending
