"""Two distributions from one repository: the client (`clients/python`, `tokenwire`)
and the server (top level, `tokenwire-server`), released together."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import tokenwire
import tokenwire_server

ROOT = Path(__file__).resolve().parent.parent
SERVER = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CLIENT = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text(encoding="utf-8"))


def names(requirements: list[str]) -> list[str]:
    return sorted(re.match(r"[\w.-]+", r)[0] for r in requirements)  # type: ignore[index]


def test_versions_move_together() -> None:
    version = CLIENT["project"]["version"]
    assert SERVER["project"]["version"] == version
    assert tokenwire.__version__ == tokenwire_server.__version__ == version
    assert f"tokenwire=={version}" in SERVER["project"]["dependencies"]


def test_the_client_needs_only_grpc_and_protobuf() -> None:
    assert CLIENT["project"]["name"] == "tokenwire"
    assert names(CLIENT["project"]["dependencies"]) == [
        "googleapis-common-protos",
        "grpcio",
        "protobuf",
    ]
    assert CLIENT["project"]["scripts"] == {"tokenwire": "tokenwire.cli:main"}


def test_the_server_brings_its_commands_by_entry_point() -> None:
    assert SERVER["project"]["name"] == "tokenwire-server"
    assert "scripts" not in SERVER["project"]  # `tokenwire` is the client's
    commands = SERVER["project"]["entry-points"]["tokenwire.commands"]
    assert sorted(commands) == ["audit", "keys", "serve"]
    for target in commands.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_shared_requirements_agree() -> None:
    """A requirement both distributions state is stated the same way."""
    client = {names([r])[0]: r for r in CLIENT["project"]["dependencies"]}
    server = {names([r])[0]: r for r in SERVER["project"]["dependencies"]}
    for name in client.keys() & server.keys():
        assert client[name] == server[name], name
