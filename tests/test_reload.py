"""SIGHUP reloads each file on its own, and a bad configuration stops the start
with exit status 2 and one line: a real `tokenwire serve` process, real
signals, real TLS handshakes, the real /metrics page."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme

from tests.conftest import collect, completed_of, run_serve, start_serve_process, stream_request
from tests.test_auth import KEY_A, KEY_B, keys_file
from tests.test_tls import Pki
from tokenwire import tls_credentials
from tokenwire.v1 import respond_pb2_grpc

POLICY_V1 = "id: live\nversion: '1'\nredact:\n  - detector: email\n"
ROUTES = """\
[[upstreams]]
name = "primary"
base_url = "http://127.0.0.1:9/v1"
model = "primary-model"
"""


def replace_file(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


class Served:
    """A running `tokenwire serve` with every reloadable file, and its log."""

    def __init__(self, tmp: Path, pki: Pki) -> None:
        self.pki = pki
        self.keys = tmp / "keys.yaml"
        keys_file(self.keys, ("acme", KEY_A), ("globex", KEY_B))
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(POLICY_V1)
        self.config = tmp / "tokenwire.toml"
        self.config.write_text(ROUTES)
        self.process: asyncio.subprocess.Process
        self.address = ""
        self.metrics_url = ""
        self.log: list[dict[str, object]] = []

    async def start(self) -> None:
        self.process, self.address = await start_serve_process(
            "--config",
            str(self.config),
            "--auth-keys-file",
            str(self.keys),
            "--policy",
            str(self.policy),
            "--tls-cert",
            self.pki.server_cert,
            "--tls-key",
            self.pki.server_key,
            "--metrics-port",
            "0",
            "--log-format",
            "json",
        )
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), 30)).decode()
        self.metrics_url = line.split()[-1]
        self.address = self.address.replace("127.0.0.1", "localhost")

    async def hup_until(self, text: str) -> list[dict[str, object]]:
        """Sends SIGHUP and returns the log lines up to the one containing `text`
        ("reload finished" comes after the metrics are counted)."""
        assert self.process.stderr is not None
        self.process.send_signal(signal.SIGHUP)
        lines: list[dict[str, object]] = []
        while True:
            raw = await asyncio.wait_for(self.process.stderr.readline(), 30)
            assert raw, "the server exited"
            record = json.loads(raw)  # every line is JSON
            lines.append(record)
            if text in str(record["message"]):
                return lines

    def metric(self, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in body.splitlines():
            if line.startswith(f"{name}{{") and wanted in line.replace('", ', '",'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def call(self, key: str, model: str = "", ca: str | None = None) -> grpc.StatusCode:
        credentials = tls_credentials(ca or self.pki.ca_pem)
        async with grpc.aio.secure_channel(self.address, credentials) as channel:
            stub = respond_pb2_grpc.RespondServiceStub(channel)
            call = stub.StreamRespond(
                stream_request("hello", model=model),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=20,
            )
            try:
                completed_of(await collect(call))
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    running = Served(tmp_path, Pki(tmp_path))
    await running.start()
    try:
        yield running
    finally:
        if running.process.returncode is None:
            running.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(running.process.wait(), 30)
            except TimeoutError:
                running.process.kill()
                await running.process.wait()


async def test_a_revoked_key_is_refused_even_when_every_other_file_is_broken(
    served: Served,
) -> None:
    assert await served.call(KEY_B) == grpc.StatusCode.OK
    keys_file(served.keys, ("acme", KEY_A))  # globex's key revoked
    served.policy.write_text("id: live\nversion: '2'\nredact: 5\n")  # wrong type
    replace_file(served.pki.server_cert, b"not a certificate\n")
    served.config.write_text(ROUTES + 'fallback = ["nowhere"]\n')

    lines = await served.hup_until("reload finished")

    failures = [line for line in lines if line["level"] == "ERROR"]
    assert [str(line["message"]).split(" ", 1)[0] for line in failures] == [
        "tls",
        "policy",
        "routing",
    ]
    assert "not a certificate" not in json.dumps(lines)
    assert all("\n" not in str(line["message"]) and "Traceback" not in str(line) for line in lines)
    assert "policy.yaml" in str(failures[1]["message"]) and "redact" in str(failures[1]["message"])
    assert "nowhere" in str(failures[2]["message"])
    assert any(line["message"] == "keys reloaded: 1 keys" for line in lines)

    assert await served.call(KEY_B) == grpc.StatusCode.UNAUTHENTICATED
    assert await served.call(KEY_A) == grpc.StatusCode.OK  # the old certificate still serves
    assert await served.call(KEY_A, model="primary-model") == grpc.StatusCode.UNAVAILABLE
    assert served.metric("tokenwire_config_reloads_total", file="keys", result="ok") == 1
    for name in ("tls", "policy", "routing"):
        assert served.metric("tokenwire_config_reloads_total", file=name, result="failed") == 1
    keys_loaded = served.metric("tokenwire_config_last_good_load_timestamp_seconds", file="keys")
    tls_loaded = served.metric("tokenwire_config_last_good_load_timestamp_seconds", file="tls")
    assert keys_loaded > tls_loaded > 0


async def test_new_tls_material_serves_new_connections(served: Served, tmp_path: Path) -> None:
    new_ca = trustme.CA()
    issued = new_ca.issue_cert("127.0.0.1", "localhost")
    new_ca_pem = tmp_path / "new-ca.pem"
    new_ca_pem.write_bytes(new_ca.cert_pem.bytes())
    old_channel = grpc.aio.secure_channel(served.address, tls_credentials(served.pki.ca_pem))
    try:
        stub = respond_pb2_grpc.RespondServiceStub(old_channel)
        metadata = (("authorization", f"Bearer {KEY_A}"),)
        completed_of(await collect(stub.StreamRespond(stream_request(), metadata=metadata)))
        replace_file(served.pki.server_key, issued.private_key_pem.bytes())
        replace_file(served.pki.server_cert, b"".join(p.bytes() for p in issued.cert_chain_pems))
        lines = await served.hup_until("reload finished")
        messages = [str(line["message"]) for line in lines]
        assert any(m.startswith("tls reloaded") for m in messages)
        assert any(m.startswith("policy unchanged") for m in messages)

        assert await served.call(KEY_A, ca=str(new_ca_pem)) == grpc.StatusCode.OK
        assert await served.call(KEY_A) == grpc.StatusCode.UNAVAILABLE  # old CA: no trust
        # A connection made before the rotation keeps its session.
        completed_of(await collect(stub.StreamRespond(stream_request(), metadata=metadata)))
    finally:
        await old_channel.close()
    assert served.metric("tokenwire_config_reloads_total", file="tls", result="ok") == 1
    assert served.metric("tokenwire_config_reloads_total", file="keys", result="unchanged") == 1


async def test_routes_reload_and_other_settings_wait_for_a_restart(served: Served) -> None:
    assert await served.call(KEY_A, model="second-model") == grpc.StatusCode.NOT_FOUND
    served.config.write_text(
        ROUTES
        + '\n[[upstreams]]\nname = "second"\nbase_url = "http://127.0.0.1:9/v1"\n'
        + 'model = "second-model"\n'
    )
    lines = await served.hup_until("reload finished")
    assert any("routing reloaded: 2 upstream routes" in str(x["message"]) for x in lines)
    assert not [line for line in lines if line["level"] == "ERROR"]
    assert await served.call(KEY_A, model="second-model") == grpc.StatusCode.UNAVAILABLE
    assert served.metric("tokenwire_config_reloads_total", file="routing", result="ok") == 1

    served.config.write_text(served.config.read_text() + "\n[limits]\nmax_labels = 3\n")
    lines = await served.hup_until("reload finished")
    assert any("take effect at the next restart" in str(x["message"]) for x in lines)
    assert (
        served.metric("tokenwire_config_reloads_total", file="routing", result="restart_required")
        == 1
    )


def bad_starts(tmp: Path, pki: Pki) -> dict[str, tuple[list[str], str]]:
    """Flags that must stop the server, and the text its one line must hold."""
    wrong_type = tmp / "wrong-type.yaml"
    wrong_type.write_text("id: p\nversion: '1'\nredact:\n  - detector: [email]\n")
    bad_keys = tmp / "bad-keys.yaml"
    bad_keys.write_text("keys:\n  - tenant: acme\n    sha256: 1234\n")
    other = trustme.CA().issue_cert("localhost")
    other_key = tmp / "other.key"
    other_key.write_bytes(other.private_key_pem.bytes())
    bad_routes = tmp / "routes.toml"
    bad_routes.write_text(ROUTES + "connect_timeout = nan\n")
    tls = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
    return {
        "policy wrong type": (["--policy", str(wrong_type)], "wrong-type.yaml"),
        "policy missing": (["--policy", str(tmp / "absent.yaml")], "absent.yaml"),
        "keys bad hash": (["--auth-keys-file", str(bad_keys)], "64 hex digits"),
        "tls key mismatch": (
            ["--tls-cert", pki.server_cert, "--tls-key", str(other_key)],
            "does not belong",
        ),
        "tls cert missing": (
            ["--tls-cert", str(tmp / "gone.pem"), "--tls-key", pki.server_key],
            "gone.pem",
        ),
        "client ca missing": ([*tls, "--tls-client-ca", str(tmp / "no-ca.pem")], "no-ca.pem"),
        "routes nan": (["--config", str(bad_routes)], "connect_timeout"),
        "unknown default model": (["--default-model", "nope"], "nope"),
        "grace nan": (["--grace-period", "nan"], "--grace-period"),
        "audit directory missing": (["--audit-path", str(tmp / "no" / "audit.db")], "audit_path"),
    }


async def test_a_bad_configuration_stops_serve_and_check_config_with_exit_2(
    tmp_path: Path,
) -> None:
    cases = [
        (name, mode, flags, expected)
        for name, (flags, expected) in bad_starts(tmp_path, Pki(tmp_path)).items()
        for mode in ([], ["--check-config"])
    ]
    results = await asyncio.gather(*(run_serve(*mode, *flags) for _, mode, flags, _ in cases))
    for (name, mode, _, expected), (code, err) in zip(cases, results, strict=True):
        assert code == 2, (name, mode, err)
        assert "Traceback" not in err, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tokenwire serve: "), (name, err)
        assert expected in lines[0], (name, err)


async def test_check_config_passes_a_good_configuration(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    keys = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A))
    config = tmp_path / "tokenwire.toml"
    config.write_text(ROUTES)
    code, err = await run_serve(
        "--check-config",
        "--config",
        str(config),
        "--auth-keys-file",
        keys,
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
    )
    assert (code, err.strip()) == (0, "tokenwire serve: configuration OK")


async def test_a_keys_file_with_a_bad_entry_still_revokes_what_it_no_longer_lists(
    served: Served,
) -> None:
    keys_file(served.keys, ("acme", KEY_A))
    with served.keys.open("a") as keys:  # a new entry with a truncated hash
        keys.write("  - tenant: initech\n    sha256: 9f86d0818\n")
    lines = await served.hup_until("reload finished")
    messages = [str(line["message"]) for line in lines]
    assert any(m.startswith("keys file reload failed") and "keys[1]" in m for m in messages)
    assert any("1 keys in force are no longer listed and are revoked now" in m for m in messages)
    assert await served.call(KEY_B) == grpc.StatusCode.UNAUTHENTICATED
    assert await served.call(KEY_A) == grpc.StatusCode.OK
    assert served.metric("tokenwire_config_reloads_total", file="keys", result="failed") == 1


async def test_a_keys_file_that_does_not_parse_still_revokes_what_it_no_longer_lists(
    served: Served,
) -> None:
    """One edit deletes globex's key and breaks the YAML: the file cannot load,
    and the key it no longer lists (here only in a comment) is revoked all the same."""
    keys_file(served.keys, ("acme", KEY_A))
    digest_b = hashlib.sha256(KEY_B.encode()).hexdigest()
    with served.keys.open("a") as keys:
        keys.write(f"  # - tenant: globex\n  #   sha256: {digest_b}\n  - tenant: [unclosed\n")
    lines = await served.hup_until("reload finished")
    messages = [str(line["message"]) for line in lines]
    assert any(m.startswith("keys file reload failed") for m in messages)
    assert any("1 keys in force are no longer listed and are revoked now" in m for m in messages)
    assert await served.call(KEY_B) == grpc.StatusCode.UNAUTHENTICATED
    assert await served.call(KEY_A) == grpc.StatusCode.OK


async def test_a_keys_file_restored_after_a_failed_reload_brings_back_what_it_lists(
    served: Served,
) -> None:
    """A failed reload narrowed the keys in force; putting the previous file
    back, byte for byte, is a real reload (not `unchanged`), and the gauge of
    the last good load does not move while the narrowed keys are in force."""
    original = served.keys.read_bytes()
    keys_file(served.keys, ("acme", KEY_A))
    with served.keys.open("a") as keys:
        keys.write("  - tenant: initech\n    sha256: nothex\n")
    await served.hup_until("reload finished")
    assert await served.call(KEY_B) == grpc.StatusCode.UNAUTHENTICATED
    narrowed_at = served.metric("tokenwire_config_last_good_load_timestamp_seconds", file="keys")

    await served.hup_until("reload finished")  # the same broken file: failed, not unchanged
    assert served.metric("tokenwire_config_reloads_total", file="keys", result="failed") == 2
    assert served.metric("tokenwire_config_reloads_total", file="keys", result="unchanged") == 0
    assert (
        served.metric("tokenwire_config_last_good_load_timestamp_seconds", file="keys")
        == narrowed_at
    )

    served.keys.write_bytes(original)
    lines = await served.hup_until("reload finished")
    assert any(line["message"] == "keys reloaded: 2 keys" for line in lines)
    assert await served.call(KEY_B) == grpc.StatusCode.OK
    assert await served.call(KEY_A) == grpc.StatusCode.OK
