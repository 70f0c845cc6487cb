#!/usr/bin/env bash
# Protocol benchmark, ours against the old pure-Lua protocol in one run:
#
#   WHISKER_CORE=/path/to/whisker-core bench/run-protocol.sh [lua5.4|lua5.1|luajit]
#
# Builds the release module, runs bench/protocol.lua with each implementation
# first on the path, and prints milliseconds per call and the speed-up.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
flavour=${1:-lua5.4}
cd "$root"
make --no-print-directory "build-$flavour" PROFILE=release >/dev/null 2>&1

ours=$(LUA_PATH="$root/lua/?.lua;;" LUA_CPATH="$root/build/$flavour/?.so;;" "$flavour" bench/protocol.lua ours)
if [ -z "${WHISKER_CORE:-}" ]; then
  echo "$ours"
  echo "(set WHISKER_CORE to compare with the old protocol)"
  exit 0
fi
old=$(LUA_PATH="$WHISKER_CORE/lib/?.lua;$WHISKER_CORE/lib/?/init.lua;;" "$flavour" bench/protocol.lua old)

printf '%-44s %-8s %12s %12s %9s\n' case N "old ms" "ours ms" speed-up
join -t'|' \
  <(awk '{ ms = $(NF - 1); $1 = ""; $(NF - 1) = ""; $NF = ""; sub(/^ +/, ""); sub(/ +$/, ""); print $0 "|" ms }' <<<"$old" | sort) \
  <(awk '{ ms = $(NF - 1); $1 = ""; $(NF - 1) = ""; $NF = ""; sub(/^ +/, ""); sub(/ +$/, ""); print $0 "|" ms }' <<<"$ours" | sort) |
  awk -F'|' '{
    n = $1; sub(/.*N=/, "", n); name = $1; sub(/ +N=.*/, "", name)
    printf "%-44s %-8s %12.3f %12.3f %8.1fx\n", name, n, $2, $3, $2 / $3
  }'
