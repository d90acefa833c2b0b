"""`tokenwire serve`: flags, environment and config file into one Config, then serve."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tokenwire_server.auth import KeysFileError
from tokenwire_server.config import ConfigError, add_arguments, load_config
from tokenwire_server.governance.policy_file import PolicyError
from tokenwire_server.observability.logs import configure_logging
from tokenwire_server.server import serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file with [network], [models], [deadlines], [limits], [delivery], "
        "[simulator], [logging] sections (env TOKENWIRE_CONFIG)",
    )
    add_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    import os

    config_file = args.config or (
        Path(os.environ["TOKENWIRE_CONFIG"]) if os.environ.get("TOKENWIRE_CONFIG") else None
    )
    try:
        config = load_config(vars(args), file=config_file)
    except ConfigError as error:
        print(f"tokenwire serve: {error}", file=sys.stderr)
        return 2
    configure_logging(config.logging.log_level, config.logging.log_format)
    try:
        asyncio.run(serve(config))
    except (PolicyError, KeysFileError) as error:
        print(f"tokenwire serve: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenwire-server", description="Run the tokenwire server."
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
