#!/usr/bin/env bash
# Reliability runs longer than `make test` (docs/RELIABILITY.md), in release
# builds: the 32-client load for SOAK_SECONDS (default 300) on SQLite, then on
# PostgreSQL; SOAK_KILLS (default 40) SIGKILLs of the server under concurrent
# pushes per backend; SOAK_CRASHES (default 400) SIGKILLs of a syncing client
# per scenario; the fault-injection suite. Ends with the figures measured.
# WHISKER_SKIP_PG=1 leaves PostgreSQL out.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${SOAK_SECONDS:-300}
kills=${SOAK_KILLS:-40}
crashes=${SOAK_CRASHES:-400}
figures=$(mktemp)
trap 'rm -f "$figures"' EXIT
export WHISKER_RELIABILITY_REPORT=$figures

cargo build --release -p sync-server
export WHISKER_SYNC_SERVER=${CARGO_TARGET_DIR:-$root/target}/release/whisker-sync-server
started=$(date +%s)

echo "==> load: 32 clients for ${seconds}s per backend"
WHISKER_LOAD_SECONDS=$seconds cargo test --release -p sync-server --test integration -- \
  --test-threads=1 thirty_two_clients
echo "==> server SIGKILL during concurrent pushes: $kills kills per backend"
WHISKER_SERVER_KILLS=$kills cargo test --release -p sync-server --test integration -- \
  acknowledged_pushes_survive_kill9
echo "==> client SIGKILL during syncs: $crashes kills per scenario"
WHISKER_CRASH_ITERATIONS=$crashes cargo test --release -p sync-core --test crash
echo "==> fault injection"
cargo test --release -p sync-core --test faults

echo
echo "soak figures ($(($(date +%s) - started))s):"
sed 's/^/    /' "$figures"
