#!/usr/bin/env bash
# Regenerates the Go stubs (gen/tokenwire/v1) from protos/ with buf and the
# pinned protoc-gen-go / protoc-gen-go-grpc (scripts/setup.sh installs them).
#   clients/go/generate.sh          # into clients/go/gen (commit the result)
#   clients/go/generate.sh DIR      # into DIR/gen instead (the drift check)
# BUF names the buf binary when it is not on PATH (it comes with the dev extra).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
gobin="$(go env GOBIN)"
[ -n "$gobin" ] || gobin="$(go env GOPATH | cut -d: -f1)/bin"
export PATH="$gobin:$PATH"
cd "$here"
rm -rf "$out/gen"
"${BUF:-buf}" generate --template buf.gen.yaml --output "$out"
