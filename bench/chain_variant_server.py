"""`tokenwire serve` with some chain stages left out, for bench/interceptor_cost.py only.

There is deliberately no server flag for this: the verification gate, audit
and limits are part of the contract. This launcher removes the named stage
classes from the chain the server builds, then runs the normal command line.

    python bench/chain_variant_server.py [--without ClassName ...] -- [tokenwire serve flags]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import tokenwire_server.server as server_module
from tokenwire_server.cli import main
from tokenwire_server.interceptors.chain import Chain


def without(names: set[str]) -> None:
    build = server_module.build_chain

    def filtered(*args: Any, **kwargs: Any) -> Chain:
        chain = build(*args, **kwargs)
        kept = [s for s in chain.stages if type(s).__name__ not in names]
        missing = names - {type(s).__name__ for s in chain.stages}
        if missing:
            raise SystemExit(f"no such stage in the chain: {sorted(missing)}")
        return Chain(kept)

    server_module.build_chain = filtered  # type: ignore[assignment]


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--without", nargs="*", default=[])
    without(set(parser.parse_args(argv[:split]).without))
    sys.exit(main(argv[split + 1 :]))
