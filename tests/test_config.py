"""Configuration: CLI flag over environment over file over default, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire_server.config import Config, ConfigError, load_config, setting_names


def test_defaults_need_nothing() -> None:
    config = load_config({}, env={})
    assert config == Config()
    assert config.models.default_model == "tokenwire-sim"


def test_precedence_is_cli_then_env_then_file(tmp_path: Path) -> None:
    file = tmp_path / "tokenwire.toml"
    file.write_text(
        "[network]\nport = 7001\ngrace_period = 3.5\n"
        "[delivery]\nauto_short_max_tokens = 8\nheartbeat_interval = 2.0\n"
    )
    env = {"TOKENWIRE_PORT": "7002", "TOKENWIRE_AUTO_SHORT_MAX_TOKENS": "9"}
    config = load_config({"port": "7003"}, env=env, file=file)
    assert config.network.port == 7003
    assert config.delivery.auto_short_max_tokens == 9
    assert config.network.grace_period == 3.5
    assert config.delivery.heartbeat_interval == 2.0


def test_every_setting_has_a_unique_name() -> None:
    names = setting_names()
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        ({"port": "seventy"}, {}, "--port"),
        ({}, {"TOKENWIRE_STALL_TIMEOUT": "soon"}, "TOKENWIRE_STALL_TIMEOUT"),
        ({"default_deadline": "900"}, {}, "default_deadline must not exceed max_deadline"),
        ({"port": "70000"}, {}, "port must be"),
    ],
)
def test_bad_values_are_named(cli: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(cli, env=env)


def test_unknown_file_keys_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[network]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"network\.prot"):
        load_config({}, env={}, file=file)
