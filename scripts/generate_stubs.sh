#!/usr/bin/env bash
# Regenerates the committed Python stubs from protos/ (the one command for it).
# Proto root = Python package root, so imports read `from tokenwire.v1 import respond_pb2`.
# Usage: scripts/generate_stubs.sh [OUT_DIR]   (default: clients/python)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-clients/python}"
mkdir -p "$out"
python -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  protos/tokenwire/v1/*.proto
