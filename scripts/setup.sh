#!/usr/bin/env bash
# One command for a development machine: the Python package with its dev tools,
# and the pinned Go tools the polyglot clients and the grpcurl recipes use
# (protoc-gen-go, protoc-gen-go-grpc, grpcurl), plus the TypeScript client's
# locked npm dependencies. Safe to re-run; each step is skipped when its
# toolchain is missing, and the tests that need it say so when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]' "$@"

# Debian's prometheus package brings promtool and prometheus: the SLO alert
# tests check and unit-test deploy/prometheus with them and run a real server.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "setup: promtool/prometheus not found; 'sudo apt-get install prometheus'," \
      "or the SLO alert tests will skip" >&2
  fi
fi

# Pinned versions: bump them here and nowhere else.
GO_TOOLS=(
  google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11
  google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.1
  github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3
)
if command -v go >/dev/null 2>&1; then
  for tool in "${GO_TOOLS[@]}"; do
    go install "$tool"
  done
  (cd clients/go && go mod download)
  gobin="$(go env GOBIN)"; gobin="${gobin:-$(go env GOPATH)/bin}"
  case ":$PATH:" in
    *":$gobin:"*) ;;
    *) echo "setup: grpcurl and the protoc plugins are in $gobin; add it to PATH" >&2 ;;
  esac
else
  echo "setup: go not found; the Go client and grpcurl tests will skip" >&2
fi

if command -v npm >/dev/null 2>&1 && [ -f clients/typescript/package-lock.json ]; then
  (cd clients/typescript && npm ci --silent --no-audit --no-fund)
else
  echo "setup: npm or clients/typescript missing; the TypeScript client tests will skip" >&2
fi
