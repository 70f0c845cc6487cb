#!/usr/bin/env bash
# Installs whisker-sync with LuaRocks into a temporary tree for each flavour and
# requires it from a fresh interpreter that sees only that tree.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
cd "$root"

for version in 5.4 5.1; do
  lua=lua$version
  ROCK_PROFILE=${ROCK_PROFILE:-debug} luarocks --lua-version "$version" --tree "$tree" \
    make rockspec/whisker-sync-scm-1.rockspec >"$tree/luarocks-$version.log" 2>&1 || {
    cat "$tree/luarocks-$version.log"
    exit 1
  }
  # A fresh interpreter with only the tree added to its paths: the checkout's
  # lua/ and build/ are not on them, so the modules can only come from the tree.
  (cd "$tree" && env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 "$lua" -e "
    package.path = '$tree/share/lua/$version/?.lua;' .. package.path
    package.cpath = '$tree/lib/lua/$version/?.so;' .. package.cpath
    local Protocol = require('whisker.storage.sync.protocol')
    local native = require('whisker_sync')
    assert(Protocol.OperationType.CREATE == 'create')
    assert(io.open('$tree/lib/lua/$version/whisker_sync.so'), 'module not installed in the tree')
    print(('rock ok: %s, module %s for %s'):format(_VERSION, native.version, native.lua_flavour))
  ")
  # The launcher LuaRocks put in the tree's bin/: `status` reads only local
  # state, so a configuration naming a server that is not running is fine.
  device="$tree/device-$version"
  mkdir -p "$device"
  (cd "$device" && env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 -u WHISKER_CORE sh -c '
    "$1/bin/whisker-sync" config --url http://127.0.0.1:9 --key rock-test --device-name rock >/dev/null &&
    "$1/bin/whisker-sync" status' _ "$tree") >"$tree/status-$version.log" 2>&1 || {
    cat "$tree/status-$version.log"
    exit 1
  }
  grep -q "Last sync: Never" "$tree/status-$version.log" &&
    grep -q "Server: http://127.0.0.1:9 (http)" "$tree/status-$version.log" || {
    cat "$tree/status-$version.log"
    exit 1
  }
  echo "rock ok: $tree/bin/whisker-sync status ($lua)"
done
