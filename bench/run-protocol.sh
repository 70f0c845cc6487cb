#!/usr/bin/env bash
# Protocol benchmark, ours against the old pure-Lua protocol in one process:
#
#   WHISKER_CORE=/path/to/whisker-core bench/run-protocol.sh [lua5.4|lua5.1|luajit]
#
# Builds the release module and runs bench/protocol.lua, which loads both
# implementations and times them alternately on the same inputs.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
flavour=${1:-lua5.4}
cd "$root"
make --no-print-directory "build-$flavour" PROFILE=release >/dev/null 2>&1

old_lib=()
if [ -n "${WHISKER_CORE:-}" ]; then
  old_lib=("$WHISKER_CORE/lib")
fi
LUA_PATH="$root/lua/?.lua;;" LUA_CPATH="$root/build/$flavour/?.so;;" "$flavour" bench/protocol.lua "${old_lib[@]}"
if [ -z "${WHISKER_CORE:-}" ]; then
  echo "(set WHISKER_CORE to compare with the old protocol)"
fi
