#!/usr/bin/env bash
# One command for a development machine, safe to re-run:
#   1. a virtualenv in .venv (Debian's python refuses system-wide pip installs);
#   2. both distributions into it, editable, with the dev tools: the client
#      (clients/python, `tokenwire`) and the server (`tokenwire-server`);
#      with --llama also the in-process llama.cpp model and its server;
#   3. Debian's prometheus (promtool) for the SLO alert tests, when root;
#   4. the pinned Go tools (protoc-gen-go, protoc-gen-go-grpc, grpcurl) and the
#      Go client's modules; 5. the TypeScript client's locked npm dependencies.
# A step whose toolchain is missing is skipped with a line saying so, and the
# tests that need it skip with the reason. Then: .venv/bin/pytest
#
# Usage: scripts/setup.sh [--llama]      PYTHON=python3.12 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

llama=0
for arg in "$@"; do
  case "$arg" in
    --llama) llama=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

started=$SECONDS
say() { printf 'setup [%3ds]: %s\n' "$((SECONDS - started))" "$*"; }

# Runs a long command with its output in a log, saying every 20 s that it is
# still at it (and what it is on), and the log's end if it fails.
run_logged() {
  local what="$1" log="$2"
  shift 2
  say "$what (log: $log)"
  "$@" >"$log" 2>&1 &
  local pid=$! step_start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      sleep 2
      kill -0 "$pid" 2>/dev/null || break 2
    done
    local doing
    doing="$(grep -E '^(Collecting|Building|Installing|Obtaining|Downloading)' "$log" | tail -1 | cut -c1-90 || true)"
    say "  ... $((SECONDS - step_start)) s${doing:+, $doing}"
  done
  if ! wait "$pid"; then
    say "FAILED: $what; the end of $log:"
    tail -25 "$log" >&2
    exit 1
  fi
  say "  done in $((SECONDS - step_start)) s"
}

# 1. The virtualenv.
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "needs Python 3.11 or newer as '$python' (set PYTHON=...)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv with $("$python" --version)"
  if ! "$python" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing Debian's python$version-venv (venv needs it)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$version-venv" >/dev/null
      "$python" -m venv .venv
    else
      say "'$python -m venv' failed: run 'sudo apt-get install python$version-venv', then this again" >&2
      exit 1
    fi
  fi
else
  say "using the virtualenv .venv ($(.venv/bin/python --version))"
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

# 2. Both distributions, editable, with the dev tools (and the llama extra).
extras="dev"
if [ "$llama" = 1 ]; then
  extras="dev,llama"
  # Measured 2026-12-04 on a 2-core machine, fresh virtualenv,
  # pip --no-cache-dir: dev alone 43 s; dev + llama 6 min 11 s wall on a quiet
  # machine (11.2 CPU-minutes), 36 min while other jobs held the load average at
  # 16-37. pip caches the built wheel: a re-run takes seconds.
  say "with --llama: llama-cpp-python compiles llama.cpp from source unless pip has" \
    "the wheel cached: about 6 min on an idle 2-core machine (measured)"
fi
run_logged "installing tokenwire (clients/python) and tokenwire-server[$extras], editable" \
  .venv/pip-install.log "${pip[@]}" install -e ./clients/python -e ".[$extras]"

# 3. Debian's prometheus package brings promtool and prometheus: the SLO alert
# tests check and unit-test deploy/prometheus with them and run a real server.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's prometheus (promtool, for the SLO alert tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    say "promtool/prometheus not found; 'sudo apt-get install prometheus'," \
      "or the SLO alert tests will skip"
  fi
fi

# 4. Pinned versions: bump them here and nowhere else.
GO_TOOLS=(
  google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11
  google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.1
  github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3
)
if command -v go >/dev/null 2>&1; then
  for tool in "${GO_TOOLS[@]}"; do
    say "go install $tool"
    go install "$tool"
  done
  say "go mod download (clients/go)"
  (cd clients/go && go mod download)
  gobin="$(go env GOBIN)"
  gobin="${gobin:-$(go env GOPATH)/bin}"
  case ":$PATH:" in
    *":$gobin:"*) ;;
    *) say "grpcurl and the protoc plugins are in $gobin (the tests find them there)" ;;
  esac
else
  say "go not found; the Go client and grpcurl tests will skip"
fi

# 5. The TypeScript client.
if command -v npm >/dev/null 2>&1 && [ -f clients/typescript/package-lock.json ]; then
  say "npm ci (clients/typescript)"
  (cd clients/typescript && npm ci --silent --no-audit --no-fund)
else
  say "npm or clients/typescript missing; the TypeScript client tests will skip"
fi

say "ready. Run the tests with: .venv/bin/pytest"
