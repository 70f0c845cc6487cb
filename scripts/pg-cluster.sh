#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests and benchmarks, on a loopback port.
#
#   scripts/pg-cluster.sh start <dir>   initdb into <dir>, start on 127.0.0.1, print the URL
#   scripts/pg-cluster.sh url <dir>     print the URL of the cluster in <dir>
#   scripts/pg-cluster.sh stop <dir>    stop the cluster and delete <dir>
#
# Environment:
#   PG_BIN    PostgreSQL server binaries (default: newest /usr/lib/postgresql/*/bin)
#   PG_PORT   port to use (default: a random free one, retried on collision)
#   PG_FSYNC  "on" for durable commits (benchmarks); default "off" (tests)
#
# PostgreSQL refuses to run as root: as root, the cluster runs as the
# `postgres` system user and <dir> is handed to it.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|url <dir>" >&2
    exit 2
}

[ $# -eq 2 ] || usage
command=$1
dir=$2

find_bin() {
    if [ -n "${PG_BIN:-}" ]; then
        echo "$PG_BIN"
        return
    fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$found" ] || [ ! -x "$found/initdb" ]; then
        echo "pg-cluster: PostgreSQL server binaries not found (install the Debian package 'postgresql', or set PG_BIN)" >&2
        exit 1
    fi
    echo "$found"
}

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

url() {
    local port
    port=$(cat "$dir/port" 2>/dev/null) || {
        echo "pg-cluster: no cluster running in $dir" >&2
        exit 1
    }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
}

start() {
    local bin
    bin=$(find_bin)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || {
            echo "pg-cluster: running as root needs the 'postgres' system user (Debian package 'postgresql' creates it)" >&2
            exit 1
        }
        chown postgres: "$dir"
        as_postgres test -w "$dir" || {
            echo "pg-cluster: the postgres user cannot reach $dir (a parent directory is private: use e.g. a directory under /tmp with mode 755)" >&2
            exit 1
        }
    fi
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }
    local fsync=${PG_FSYNC:-off}
    local attempt port
    for attempt in 1 2 3 4 5 6 7 8; do
        port=${PG_PORT:-$((20000 + RANDOM % 40000))}
        if as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
            -o "-k $dir -h 127.0.0.1 -p $port -c fsync=$fsync -c synchronous_commit=$fsync -c max_connections=300" \
            start >/dev/null 2>&1; then
            echo "$port" >"$dir/port"
            url
            return
        fi
        # Most likely the port was taken: try another one (unless it was fixed).
        [ -z "${PG_PORT:-}" ] || break
    done
    echo "pg-cluster: could not start PostgreSQL (attempt $attempt); log:" >&2
    cat "$dir/postgres.log" >&2 2>/dev/null || true
    exit 1
}

stop() {
    if [ -d "$dir/data" ]; then
        local bin
        bin=$(find_bin)
        as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case $command in
start) start ;;
stop) stop ;;
url) url ;;
*) usage ;;
esac
