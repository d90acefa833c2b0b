"""deploy/tokenwire.example.toml is `tokenwire serve --print-config`, generated from
the config dataclasses: it names every section and setting with its default and
help, loads back into the same Config as no file, and the committed copy never
drifts from the dataclasses (the failure says how to regenerate it)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

from tests.conftest import serve_env
from tokenwire_server.config import Config, UpstreamConfig, load_config, read_file_settings
from tokenwire_server.config_example import REGENERATE, UPSTREAM_HELP, render, table_arrays

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "tokenwire.example.toml"


def test_the_committed_example_is_what_print_config_prints() -> None:
    committed = EXAMPLE.read_text(encoding="utf-8")
    assert committed == render(), (
        f"{EXAMPLE.relative_to(ROOT)} differs from the config dataclasses; regenerate it "
        f"from the repository root with: {REGENERATE}"
    )


def test_every_section_and_setting_is_in_the_file_with_its_default_and_help() -> None:
    text = render()
    tables = tomllib.loads(text)
    hints = typing.get_type_hints(Config)
    arrays = table_arrays()
    assert "upstreams" in arrays
    sections = [f for f in dataclasses.fields(Config) if f.name not in arrays]
    assert set(tables) == {f.name for f in sections}, "[[upstreams]] and the like stay comments"
    for name in arrays:
        assert f"[[{name}]]" in text, f"the example does not mention [[{name}]]"
    defaults = Config()
    for section in sections:
        fields = dataclasses.fields(hints[section.name])
        assert list(tables[section.name]) == [f.name for f in fields], section.name
        for item in fields:
            assert tables[section.name][item.name] == getattr(
                getattr(defaults, section.name), item.name
            ), f"{section.name}.{item.name}"
            flag = "--" + item.name.replace("_", "-")
            assert f"# {item.metadata['help']} ({flag}, TOKENWIRE_{item.name.upper()})" in text


def test_the_file_loads_back_into_the_default_config(tmp_path: Path) -> None:
    path = tmp_path / "tokenwire.toml"
    path.write_text(render(), encoding="utf-8")
    assert load_config({}, env={}, file=path) == load_config({}, env={}) == Config()


def test_the_commented_upstream_route_loads_when_uncommented(tmp_path: Path) -> None:
    lines = render().splitlines()
    start = lines.index("#[[upstreams]]")
    block = [line[1:] for line in lines[start:] if line.startswith("#") and line[1:2] != " "]
    assert len(block) == 1 + len(dataclasses.fields(UpstreamConfig))
    path = tmp_path / "routes.toml"
    path.write_text("\n".join(block) + "\n", encoding="utf-8")
    (route,) = read_file_settings(path).upstreams
    assert route == UpstreamConfig(name="local", base_url="http://127.0.0.1:8000/v1")
    assert load_config({}, env={}, file=path).upstreams == (route,)


def test_every_upstream_key_has_a_comment() -> None:
    assert list(UPSTREAM_HELP) == [f.name for f in dataclasses.fields(UpstreamConfig)], (
        "add the new [[upstreams]] key to UPSTREAM_HELP in "
        f"server/tokenwire_server/config_example.py, then: {REGENERATE}"
    )


def test_print_config_prints_a_file_check_config_accepts(tmp_path: Path) -> None:
    def tokenwire(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokenwire.cli", "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=serve_env(),
            cwd=tmp_path,  # the default audit_path is relative to it
        )

    printed = tokenwire("--print-config")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == render()
    path = tmp_path / "tokenwire.toml"
    path.write_text(printed.stdout, encoding="utf-8")
    checked = tokenwire("--check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "configuration OK" in checked.stderr
