"""`tokenwire serve --print-config`: an example configuration file, generated.

The file is made from the dataclasses of `tokenwire_server.config`, so it
cannot fall behind them: every section and every setting, each with its
default and the one-line help of its field's metadata (the same text as
`tokenwire serve --help`), plus a commented-out `[[upstreams]]` route. A file
it prints loads back with `--config` into the same `Config` as no file at all.
`deploy/tokenwire.example.toml` is its output, committed;
`tests/test_config_example.py` fails when the two differ.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from tokenwire_server.config import ENV_PREFIX, Config, UpstreamConfig

REGENERATE = "tokenwire serve --print-config > deploy/tokenwire.example.toml"

#: One line per `[[upstreams]]` key (UpstreamConfig carries no field help of its
#: own); tests/test_config_example.py fails when a field is missing here.
UPSTREAM_HELP: dict[str, str] = {
    "name": "required; the route's name, reported in Completed.serving.backend",
    "base_url": "required; the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1",
    "model": "what callers put in `model` (empty: the route's name)",
    "upstream_model": "the model name sent upstream (empty: `model`)",
    "api_key_env": "environment variable holding the upstream's API key (empty: none)",
    "connect_timeout": "seconds to connect to the upstream",
    "read_timeout": "seconds between bytes from the upstream, within the call's deadline",
    "max_retries": "streaming retries before the first token",
    "retry_backoff": "seconds before the first retry, doubled per try, with jitter",
    "stream": "false: non-streaming requests only",
    "fallback": "routes tried in order when this one fails before its first token",
}

#: Values for the example route's required keys (they have no default).
_UPSTREAM_EXAMPLE = {"name": "local", "base_url": "http://127.0.0.1:8000/v1"}


def toml_value(value: Any) -> str:
    """A default as TOML: strings as basic strings (JSON's escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def _doc(cls: type[Any]) -> str:
    """A class's own docstring (a dataclass without one gets its signature)."""
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0]


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return _UPSTREAM_EXAMPLE[item.name]


def table_arrays() -> dict[str, type[Any]]:
    """Config fields that are arrays of tables in the file (`[[upstreams]]`, ...):
    name -> the dataclass of one table."""
    hints = typing.get_type_hints(Config)
    return {
        f.name: typing.get_args(hints[f.name])[0]
        for f in dataclasses.fields(Config)
        if typing.get_origin(hints[f.name]) is tuple
    }


def _other_table_array(name: str, table: type[Any]) -> list[str]:
    """A pointer to the module that documents a table array other than upstreams."""
    module = sys.modules[table.__module__]
    about = (module.__doc__ or "").strip().splitlines()
    where = Path(module.__file__ or "").as_posix()
    where = "server/" + where.split("/server/", 1)[1] if "/server/" in where else where
    lines = ["", f"# [[{name}]]: none by default."]
    if about:
        lines.append(f"# {about[0]}")
    lines.append(f"# Every key, with an example: {where}.")
    return lines


def render() -> str:
    """The example file's text."""
    lines = [
        "# tokenwire serve: every setting, with its default.",
        "#",
        "# Generated from server/tokenwire_server/config.py by",
        f"#   {REGENERATE}",
        "# Load it with `tokenwire serve --config FILE` (or TOKENWIRE_CONFIG=FILE); as",
        "# printed it changes nothing. Every key is also a flag (--grace-period) and an",
        "# environment variable (TOKENWIRE_GRACE_PERIOD); precedence: flag, environment,",
        "# this file, default. Delete what you keep at its default. SIGHUP reloads the",
        "# [[upstreams]] routes; every other key here is read at start only.",
        "# Reference: docs/configuration.md.",
    ]
    hints = typing.get_type_hints(Config)
    arrays = table_arrays()
    for section in dataclasses.fields(Config):
        if section.name in arrays:
            continue
        section_type = hints[section.name]
        lines += ["", f"[{section.name}]"]
        if doc := _doc(section_type):
            lines.append(f"# {doc}")
        for item in dataclasses.fields(section_type):
            flag = "--" + item.name.replace("_", "-")
            env = ENV_PREFIX + item.name.upper()
            lines.append(f"# {item.metadata['help']} ({flag}, {env})")
            lines.append(f"{item.name} = {toml_value(_default(item))}")
    lines += [
        "",
        "# Routes to OpenAI-compatible upstreams: none by default. Each [[upstreams]]",
        "# table is one route; repeat it for more (SIGHUP reloads them). To use this one,",
        "# remove the '#' before each line below that has none after it: name and",
        "# base_url are required, the rest shows the defaults. See docs/backends.md.",
        "#[[upstreams]]",
    ]
    for item in dataclasses.fields(UpstreamConfig):
        lines.append(f"# {UPSTREAM_HELP[item.name]}")
        lines.append(f"#{item.name} = {toml_value(_default(item))}")
    for name, table in arrays.items():
        if name != "upstreams":
            lines += _other_table_array(name, table)
    return "\n".join(lines) + "\n"
