"""`tokenwire serve`: flags, environment and config file into one Config, then serve."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tokenwire_server.config import Config, ConfigError, add_arguments, load_config
from tokenwire_server.observability.logs import configure_logging
from tokenwire_server.reload import LoadError
from tokenwire_server.server import TokenwireServer, serve


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
    import os

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
    server = TokenwireServer(config, config_file=config_file)
    await server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenwire-server", description="Run the tokenwire server."
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
