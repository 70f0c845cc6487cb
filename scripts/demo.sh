#!/usr/bin/env bash
# whisker-sync demo (`make demo`): a sync server on this machine and two
# devices, a laptop and a desktop, each a folder with its own stories. Every
# step uses the real `whisker sync` command (bin/whisker-sync); stories are
# written by scripts/story.lua, standing in for the editor.
#
#   make demo                      (builds first)
#   DEMO_LUA=luajit scripts/demo.sh   (after `make build-luajit` and `cargo build -p sync-server`)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
lua=${DEMO_LUA:-lua5.4}
server=${WHISKER_SYNC_SERVER:-$root/target/debug/whisker-sync-server}
[ -x "$server" ] || { echo "demo: $server not built (run 'make demo')" >&2; exit 1; }
[ -f "$root/build/$lua/whisker_sync.so" ] || { echo "demo: build/$lua not built (run 'make demo')" >&2; exit 1; }

work=$(mktemp -d)
server_pid=
start_pid=
cleanup() {
  [ -n "$start_pid" ] && kill "$start_pid" 2>/dev/null
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
begin=$SECONDS

bold= plain=
if [ -t 1 ]; then
  bold=$(tput bold 2>/dev/null || true)
  plain=$(tput sgr0 2>/dev/null || true)
fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
say() { printf '%s$ %s%s\n' "$bold" "$*" "$plain"; }

# sync DEVICE ARGS...: `whisker sync ARGS` on a device, shown as typed.
sync() {
  local device=$1
  shift
  say "($device) whisker sync $*"
  (cd "$work/$device" && WHISKER_SYNC_LUA="$lua" "$root/bin/whisker-sync" "$@") 2>&1 | sed 's/^/    /'
}
# edit DEVICE save|delete ...: the editor changes a story on a device.
edit() {
  local device=$1
  shift
  say "($device) edit: $*"
  (cd "$work/$device" && "$lua" "$root/scripts/story.lua" "$@")
}
holdings() {
  local device
  for device in laptop desktop; do
    echo "  $device holds:"
    (cd "$work/$device" && "$lua" "$root/scripts/story.lua" list) | sed 's/^/      /'
  done
}

step "Start a sync server (SQLite file, loopback port) and register an API key"
"$server" keys add --name demo --key demo-key --db "$work/server.db" >/dev/null
"$server" serve --db "$work/server.db" --listen 127.0.0.1:0 >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  grep -q '^listening on ' "$work/server.log" && break
  sleep 0.1
done
url=$(sed -n 's/^listening on //p' "$work/server.log" | head -1)
[ -n "$url" ] || { cat "$work/server.log"; exit 1; }
echo "  whisker-sync-server listening on $url"
mkdir -p "$work/laptop" "$work/desktop"

step "1. Configure both devices (the desktop keeps conflicts for the writer to decide)"
sync laptop config --url "$url" --key demo-key --device-name Laptop --interval 500
sync desktop config --url "$url" --key demo-key --device-name Desktop --strategy manual

step "2. Write three stories on the laptop and sync it"
edit laptop save garden "The Secret Garden"
edit laptop save lighthouse "The Lighthouse Keeper"
edit laptop save heist "The Museum Heist"
sync laptop now
holdings

step "3. The desktop syncs and receives them"
sync desktop now
holdings

step "4. Edit different stories on both devices, sync both"
edit laptop save garden "The Secret Garden (revised on the laptop)"
edit desktop save lighthouse "The Lighthouse Keeper (revised on the desktop)"
sync laptop now
sync desktop now
sync laptop now
holdings

step "5. Delete a story on the desktop; the delete travels too"
edit desktop delete heist
sync desktop now
sync laptop now
holdings

step "6. A conflict: both devices change the same story before syncing"
edit laptop save garden "The Secret Garden: laptop ending"
edit desktop save garden "The Secret Garden: desktop ending"
sync laptop now
sync desktop now
sync desktop conflicts
sync desktop conflicts resolve garden --use both
sync desktop now
sync laptop now
holdings

step "7. Auto-sync: the laptop runs 'whisker sync start'; the desktop keeps writing"
say "(laptop) whisker sync start &"
(trap - EXIT INT TERM && cd "$work/laptop" && exec env WHISKER_SYNC_LUA="$lua" "$root/bin/whisker-sync" start) \
  >"$work/start.log" 2>&1 &
start_pid=$!
for _ in $(seq 100); do
  grep -q 'up to date\|synced' "$work/start.log" && break
  sleep 0.1
done
edit desktop save epilogue "Epilogue, written on the desktop"
sync desktop now
for _ in $(seq 100); do
  listing=$(cd "$work/laptop" && "$lua" "$root/scripts/story.lua" list)
  grep -q '^epilogue ' <<<"$listing" && break
  sleep 0.1
done
sync laptop stop
wait "$start_pid" || true
start_pid=
echo "  what the running 'start' printed:"
sed 's/^/    /' "$work/start.log"
holdings

step "8. Status and statistics (no server contact needed)"
sync desktop status
sync desktop stats

step "Done in $((SECONDS - begin))s; the server is stopped and the temporary folders removed"
