#!/usr/bin/env bash
# Server benchmark: push/pull throughput and latency against a release build
# of whisker-sync-server on loopback, with SQLite and with PostgreSQL.
#
#   crates/sync-server/bench/run.sh [seconds-per-phase]     (default 5)
#
# Environment: TARGET_DIR (cargo target dir, default target), SKIP_PG=1 to
# measure SQLite only. Prints a Markdown table on stdout; progress on stderr.
# Everything it starts (servers, the PostgreSQL cluster) is stopped and its
# files removed on exit.
set -euo pipefail

seconds=${1:-5}
root=$(cd "$(dirname "$0")/../../.." && pwd)
target=${TARGET_DIR:-$root/target}
key=bench-key-0123456789

echo "building release binaries..." >&2
(cd "$root" && cargo build --release -p sync-server --bin whisker-sync-server --example loadgen --target-dir "$target" >&2)
server_bin=$target/release/whisker-sync-server
loadgen=$target/release/examples/loadgen

work=$(mktemp -d)
chmod 755 "$work" # the PostgreSQL cluster inside runs as another user when we are root
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ -d "$work/pg" ]; then
        "$root/scripts/pg-cluster.sh" stop "$work/pg" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Starts the server with the given database arguments; sets $url.
start_server() {
    "$server_bin" keys add bench --key "$key" "$@" >/dev/null
    "$server_bin" serve "$@" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.log" &
    server_pid=$!
    for _ in $(seq 1 100); do
        if [ -s "$work/server.out" ]; then
            break
        fi
        sleep 0.1
    done
    url=$(sed -n 's/^listening on //p' "$work/server.out" | head -n 1)
    [ -n "$url" ] || {
        cat "$work/server.log" >&2
        exit 1
    }
}

stop_server() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=
}

echo "SQLite (synchronous=FULL)..." >&2
start_server --db "$work/bench.db"
"$loadgen" --url "$url" --key "$key" --seconds "$seconds" --label sqlite
stop_server

if [ "${SKIP_PG:-}" != 1 ]; then
    echo "PostgreSQL (fsync on)..." >&2
    pg_url=$(PG_FSYNC=on "$root/scripts/pg-cluster.sh" start "$work/pg")
    start_server --database-url "$pg_url"
    "$loadgen" --url "$url" --key "$key" --seconds "$seconds" --label postgres | tail -n +3
    stop_server
fi
