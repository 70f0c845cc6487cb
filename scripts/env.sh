#!/bin/sh
# Prints the exports that put this checkout's Lua modules and the native module
# built for FLAVOUR first on the Lua search paths, like `luarocks path` does:
#
#   eval "$(scripts/env.sh lua5.4)"
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  lua5.4 | lua5.1 | luajit) flavour=$1 ;;
  *)
    echo "usage: $0 lua5.4|lua5.1|luajit" >&2
    exit 2
    ;;
esac

if [ ! -f "$root/build/$flavour/whisker_sync.so" ]; then
  echo "note: $root/build/$flavour/whisker_sync.so is not built yet (make build-$flavour)" >&2
fi

lua_path="$root/lua/?.lua;$root/lua/?/init.lua;"
lua_cpath="$root/build/$flavour/?.so;"
# A trailing ';;' keeps Lua's default paths after ours when none were set.
echo "export LUA_PATH='$lua_path'\"\${LUA_PATH:-;}\""
echo "export LUA_CPATH='$lua_cpath'\"\${LUA_CPATH:-;}\""
# Lua 5.4 prefers the versioned variables when they are set.
if [ "$flavour" = lua5.4 ] && [ -n "${LUA_PATH_5_4:-}" ]; then
  echo "export LUA_PATH_5_4='$lua_path'\"\$LUA_PATH_5_4\""
fi
if [ "$flavour" = lua5.4 ] && [ -n "${LUA_CPATH_5_4:-}" ]; then
  echo "export LUA_CPATH_5_4='$lua_cpath'\"\$LUA_CPATH_5_4\""
fi
