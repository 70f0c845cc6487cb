#!/usr/bin/env bash
# Engine benchmark, ours against the old pure-Lua engine, both over loopback
# HTTP to one release-built reference server (and in-process):
#
#   WHISKER_CORE=/path/to/whisker-core bench/run-engine.sh
#
# The old engine runs on Lua 5.4 only (it uses `goto`), with its own HTTP
# transport (luasocket).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
make --no-print-directory build-lua5.4 PROFILE=release >/dev/null 2>&1
cargo build --release -q -p sync-server
server=$root/target/release/whisker-sync-server
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
"$server" serve --db "$work/sync.db" --listen 127.0.0.1:0 >"$work/banner" 2>/dev/null &
pid=$!
for _ in $(seq 100); do
  grep -q listening "$work/banner" 2>/dev/null && break
  sleep 0.05
done
url=$(sed -n 's/^listening on //p' "$work/banner")

ours_path="$root/lua/?.lua;;"
cpath="$root/build/lua5.4/?.so;;"
LUA_PATH="$ours_path" LUA_CPATH="$cpath" lua5.4 bench/engine.lua ours "$url" "$server" "$work/sync.db" >"$work/ours"
if [ -n "${WHISKER_CORE:-}" ]; then
  LUA_PATH="$WHISKER_CORE/lib/?.lua;$WHISKER_CORE/lib/?/init.lua;;" LUA_CPATH="$cpath" \
    lua5.4 bench/engine.lua old "$url" "$server" "$work/sync.db" >"$work/old"
else
  : >"$work/old"
  echo "(set WHISKER_CORE to compare with the old engine)"
fi

printf '%-40s %6s %11s %11s %13s %13s\n' case N "old ms" "ours ms" "old bytes" "ours bytes"
awk -F'\t' '
  $1 == "old" { old_ms[$2 FS $3] = $4; old_b[$2 FS $3] = $5 }
  $1 == "ours" { order[++n] = $2 FS $3; ms[$2 FS $3] = $4; b[$2 FS $3] = $5 }
  END {
    for (i = 1; i <= n; i++) {
      k = order[i]; split(k, part, FS)
      printf "%-40s %6s %11s %11.1f %13s %13d\n", part[1], part[2],
        (k in old_ms) ? old_ms[k] : "-", ms[k], (k in old_b) ? old_b[k] : "-", b[k]
    }
  }' "$work/old" "$work/ours"
