"""The operator's subcommands of `tokenwire`: `serve`, `audit`, `keys`.

The `tokenwire` command belongs to the client distribution (`tokenwire`); this
one (`tokenwire-server`) adds these through the `tokenwire.commands`
entry-point group (pyproject.toml). Each entry point is an `add_*_parser`
function below: it adds one subcommand and sets `run` (args -> exit status).
Building the parser imports only this module and the configuration's flags,
so `tokenwire ask` stays quick with the server installed; the server itself
is imported when `serve` runs.

`python -m tokenwire_server` is `tokenwire serve` (see `main`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from tokenwire_server.config import Config, ConfigError, add_arguments, load_config
from tokenwire_server.reload import LoadError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file with [network], [models], [deadlines], [limits], [delivery], "
        "[simulator], [logging] sections (env TOKENWIRE_CONFIG)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="load and check the configuration, policy, keys file, TLS files, routes and "
        "audit file as `serve` would, then exit: 0 when the server would start, 2 (with "
        "the problem) when it would not",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print an example config file (every setting with its default and meaning), exit",
    )
    add_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    """Exit status 2, with one line naming the setting or file, when the
    configuration cannot be used: at start and with --check-config alike."""
    from tokenwire_server.observability.logs import configure_logging
    from tokenwire_server.server import serve

    if args.print_config:
        from tokenwire_server.config_example import render

        sys.stdout.write(render())
        return 0
    config_file = args.config or (
        Path(os.environ["TOKENWIRE_CONFIG"]) if os.environ.get("TOKENWIRE_CONFIG") else None
    )
    try:
        config = load_config(vars(args), file=config_file)
        configure_logging(config.logging.log_level, config.logging.log_format)
        if args.check_config:
            asyncio.run(_check(config, config_file))
            print("tokenwire serve: configuration OK", file=sys.stderr)
        else:
            asyncio.run(serve(config, config_file))
    except (ConfigError, LoadError) as error:
        print(f"tokenwire serve: {error}", file=sys.stderr)
        return 2
    return 0


async def _check(config: Config, config_file: Path | None) -> None:
    from tokenwire_server.server import TokenwireServer

    server = TokenwireServer(config, config_file=config_file)
    await server.close()


def _restart_with_quiet_grpc_core() -> None:
    """grpc's C core writes its own lines (a failed TLS handshake, one per bad
    client) to stderr as plain text, into a JSON log; it reads GRPC_VERBOSITY
    once, when grpc is first imported, which the `tokenwire` command has already
    done. So `serve` starts again in place (exec: the same process id, so the
    same signals from systemd or the kubelet) with the core silenced; an
    operator who wants its lines sets GRPC_VERBOSITY themselves."""
    os.environ["GRPC_VERBOSITY"] = "NONE"
    serve_args = sys.argv[sys.argv.index("serve") + 1 :]
    os.execv(sys.executable, [sys.executable, "-m", "tokenwire_server", *serve_args])


def _serve(args: argparse.Namespace) -> int:
    if getattr(args, "from_command_line", False) and "GRPC_VERBOSITY" not in os.environ:
        _restart_with_quiet_grpc_core()
    return run_serve(args)


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the tokenwire server")
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)


def add_audit_parser(commands: Any) -> None:
    from tokenwire_server.audit.commands import add_arguments as add_audit_arguments

    audit = commands.add_parser(
        "audit", help="read and verify the server's audit trail (list, show, verify)"
    )
    add_audit_arguments(audit)
    audit.set_defaults(run=_audit)


def _audit(args: argparse.Namespace) -> int:
    from tokenwire_server.audit.commands import run

    return run(args, sys.stdout, sys.stderr)


def add_keys_parser(commands: Any) -> None:
    keys = commands.add_parser("keys", help="API key helpers for the server's keys file")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_commands.add_parser(
        "hash", help="print the SHA-256 to put in the keys file, for a key read from stdin"
    )
    keys.set_defaults(run=_keys)


def _keys(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("tokenwire keys hash: no key on stdin", file=sys.stderr)
        return 2
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenwire_server [serve flags]`: what `tokenwire serve` runs."""
    parser = argparse.ArgumentParser(
        prog="tokenwire-server", description="Run the tokenwire server."
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
