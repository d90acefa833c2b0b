"""Container health check: asks tokenwire's grpc.health.v1 whether it serves.

    python healthcheck.py [ADDRESS] [--service NAME] [--timeout SECONDS]

Exit status 0 when the answer is SERVING, 1 otherwise (NOT_SERVING during a
drain, an unknown service, no answer within the timeout, nothing listening),
with one line on stderr saying which. ADDRESS defaults to
TOKENWIRE_HEALTHCHECK_ADDRESS, else 127.0.0.1 and the port in TOKENWIRE_PORT
(50051). The image's HEALTHCHECK runs it with the image's Python, which has
grpcio and grpcio-health-checking (the server's dependencies), so the image
needs no grpc_health_probe binary. Plaintext only, like kubelet's gRPC probes:
with TLS on the main port, point it at `health_port`.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    explicit = os.environ.get("TOKENWIRE_HEALTHCHECK_ADDRESS")
    if explicit:
        return explicit
    return f"127.0.0.1:{os.environ.get('TOKENWIRE_PORT', '50051')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="grpc.health.v1 Check against tokenwire")
    parser.add_argument("address", nargs="?", default=default_address())
    parser.add_argument("--service", default="", help='health service name ("" = the server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            name = code.name if code is not None else type(error).__name__
            print(f"unhealthy: {args.address} {args.service!r}: {name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.address} {args.service!r}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
