#!/usr/bin/env bash
# End-to-end test of the `whisker sync` command (bin/whisker-sync) against the
# real whisker-sync-server on 127.0.0.1: two device folders per scenario, the
# real launcher, the real transports. Scenarios: our file store over HTTP
# (Lua 5.4) and over WebSocket (Lua 5.1), and — when WHISKER_CORE names a
# whisker-core checkout — whisker-core's StorageService (LuaJIT).
#
#   scripts/test-cli-e2e.sh            (WHISKER_SYNC_SERVER=<binary> to use another server build)
#
# Ends with "cli: N passed, N failed"; exits non-zero when a check failed.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
server=${WHISKER_SYNC_SERVER:-$root/target/debug/whisker-sync-server}
if [ ! -x "$server" ]; then
  echo "building whisker-sync-server..."
  (cd "$root" && cargo build -p sync-server --quiet) || exit 1
fi

work=$(mktemp -d)
bg_pids=()
cleanup() {
  for pid in "${bg_pids[@]}"; do
    kill "$pid" 2>/dev/null
  done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
check() {
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "  ok    $what"
  else
    failed=$((failed + 1))
    echo "  FAIL  $what"
    if [ -n "${last_out:-}" ] && [ -f "$last_out" ]; then sed 's/^/        | /' "$last_out" | tail -n 20; fi
  fi
}

fails() { ! "$@"; }

# wait_for SECONDS COMMAND...: polls COMMAND every 0.1 s until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

scenarios=()
keys=()
add_scenario() { # name lua transport core
  [ -f "$root/build/$2/whisker_sync.so" ] || { echo "skip $1: build/$2 not built"; return; }
  command -v "$2" >/dev/null || { echo "skip $1: $2 not installed"; return; }
  scenarios+=("$1 $2 $3 $4")
  keys+=("key-$1")
}
add_scenario filestore-http lua5.4 http no
add_scenario filestore-ws lua5.1 websocket no
if [ -n "${WHISKER_CORE:-}" ]; then
  add_scenario core-ws luajit websocket yes
else
  echo "note: WHISKER_CORE not set, whisker-core's StorageService scenario skipped"
fi

db="$work/server.db"
for key in "${keys[@]}"; do
  "$server" keys add --key "$key" --db "$db" >/dev/null || exit 1
done
"$server" serve --db "$db" --listen 127.0.0.1:0 >"$work/server.log" 2>&1 &
server_pid=$!
bg_pids+=("$server_pid")
wait_for 20 grep -q '^listening on ' "$work/server.log" || {
  cat "$work/server.log"
  exit 1
}
url=$(sed -n 's/^listening on //p' "$work/server.log" | head -1)
echo "server: $url"

run_scenario() {
  local name=$1 lua=$2 transport=$3 core=$4
  local a="$work/$name-a" b="$work/$name-b"
  mkdir -p "$a" "$b"
  local core_env=()
  if [ "$core" = yes ]; then core_env=(WHISKER_CORE="$WHISKER_CORE"); else core_env=(-u WHISKER_CORE); fi
  echo "==> $name ($lua, $transport, $([ "$core" = yes ] && echo "whisker-core StorageService" || echo "file store"))"

  # ws DEVICE ARGS...: runs `whisker-sync ARGS` in a device folder; output in $work/out.
  last_out="$work/out"
  ws() {
    local dir=$1
    shift
    (cd "$dir" && env "${core_env[@]}" WHISKER_SYNC_LUA="$lua" "$root/bin/whisker-sync" "$@") >"$work/out" 2>&1 </dev/null
  }
  story() {
    local dir=$1
    shift
    (cd "$dir" && env "${core_env[@]}" "$lua" "$root/scripts/story.lua" "$@")
  }
  has() { grep -qF -- "$1" "$work/out"; }
  # (the listing is captured first: `grep -q` exiting early would break the pipe)
  lists() {
    local listing
    listing=$(story "$1" list) && grep -qE "^$2 +$3\$" <<<"$listing"
  }
  lacks() {
    local listing
    listing=$(story "$1" list) && ! grep -qE "^$2 " <<<"$listing"
  }

  check "config A" ws "$a" config --url "$url" --key "key-$name" --transport "$transport" --device-name A
  check "config file is private (0600)" test "$(stat -c %a "$a/.whisker-sync-config.json")" = 600
  check "config B" ws "$b" config --url "$url" --key "key-$name" --transport "$transport" \
    --device-name B --interval 300
  check "bad --interval is an error" fails ws "$b" config --interval abc
  check "  ... with a clear message" has "--interval must be a number of milliseconds"

  story "$a" save one "One"
  story "$a" save two "Two"
  check "now on A" ws "$a" now
  check "  ... reports completion" has "✓ Sync complete"
  check "now on B" ws "$b" now
  check "  ... B received A's stories" lists "$b" one One
  check "status B" ws "$b" status
  check "  ... last sync is real" bash -c '! grep -q "Last sync: Never" "$1"' _ "$work/out"
  check "  ... no pending operations" has "Pending: 0 operations"
  check "  ... shows the server" has "Server: $url ($transport)"
  check "  ... names the store" has "$([ "$core" = yes ] && echo "whisker-core StorageService" || echo "whisker-sync file store")"
  check "stats B prints integers" ws "$b" stats
  check "  ... one sync" has "Total syncs: 1"
  check "  ... no float counters" bash -c '! grep -qE "[0-9]\.0($|[^0-9])" "$1"' _ "$work/out"
  check "stats --json" ws "$b" stats --json
  check "  ... is JSON" has '"total_syncs":1'

  # Auto-sync on B in the background; A edits and deletes; B follows.
  (trap - EXIT && cd "$b" && exec env "${core_env[@]}" WHISKER_SYNC_LUA="$lua" "$root/bin/whisker-sync" start) \
    >"$work/start.log" 2>&1 </dev/null &
  local start_pid=$!
  bg_pids+=("$start_pid")
  check "start writes its pid file" wait_for 10 test -f "$b/.whisker-storage/.whisker-sync.pid"
  check "status sees auto-sync running" ws "$b" status
  check "  ... as running" has "Auto-sync: running"
  check "now refuses while auto-sync runs" fails ws "$b" now
  story "$a" save one "One, revised"
  story "$a" delete two
  story "$b" save three "Three, written on B"
  ws "$a" now
  check "running start picks up A's edit" wait_for 15 lists "$b" one "One, revised"
  check "  ... and A's delete" wait_for 15 lacks "$b" two
  a_gets_three() { ws "$a" now && lists "$a" three "Three, written on B"; }
  check "  ... and pushes B's new story" wait_for 15 a_gets_three
  check "stop from another process" ws "$b" stop
  check "  ... reports it" has "✓ Sync stopped (pid $start_pid)"
  local rc=0
  wait "$start_pid" || rc=$?
  check "start exits 0 after stop" test "$rc" = 0
  last_out="$work/start.log"
  check "  ... printed its syncs" grep -q "synced: " "$work/start.log"
  check "  ... and why it stopped" grep -qF "✓ Sync stopped (stop requested)" "$work/start.log"
  last_out="$work/out"
  check "  ... removed its pid file" test ! -e "$b/.whisker-storage/.whisker-sync.pid"
  check "stop with nothing running" ws "$b" stop
  check "  ... says so" has "No running sync found"

  # Ctrl+C (SIGINT) ends a running start cleanly. The signal is sent once
  # the command has printed its first sync (a fresh log, so nothing stale
  # matches), i.e. once the Lua interpreter runs it.
  : >"$work/start2.log"
  (trap - EXIT && cd "$b" && exec env "${core_env[@]}" WHISKER_SYNC_LUA="$lua" "$root/bin/whisker-sync" start) \
    >"$work/start2.log" 2>&1 </dev/null &
  start_pid=$!
  bg_pids+=("$start_pid")
  wait_for 10 grep -q "up to date\|synced" "$work/start2.log"
  kill -INT "$start_pid"
  rc=0
  wait "$start_pid" || rc=$?
  last_out="$work/start2.log"
  check "Ctrl+C stops start with exit 0" test "$rc" = 0
  check "  ... cleanly" grep -qF "✓ Sync stopped (interrupted)" "$work/start2.log"
  last_out="$work/out"
  check "  ... and removes the pid file" test ! -e "$b/.whisker-storage/.whisker-sync.pid"

  # A conflict left for the user (manual strategy on B), resolved by hand.
  ws "$b" config --strategy manual
  ws "$b" now
  ws "$a" now
  story "$a" save one "Edited on A"
  story "$b" save one "Edited on B"
  ws "$a" now
  check "conflicting sync on B succeeds" ws "$b" now
  check "  ... and leaves the conflict" has "conflict on 'one': left for you"
  check "conflicts lists it" ws "$b" conflicts
  check "  ... with both versions" has 'remote: "Edited on A"'
  check "conflicts resolve --use local" ws "$b" conflicts resolve one --use local
  check "  ... confirms" has "✓ Resolved 'one'"
  ws "$b" now
  ws "$a" now
  check "B's choice reaches A" lists "$a" one "Edited on B"
  check "no conflicts left" ws "$b" conflicts
  check "  ... says so" has "No unresolved conflicts"

  # reset: confirmation needed without a terminal; --yes works.
  check "reset without a terminal or --yes fails" fails ws "$b" reset
  check "  ... and says to use --yes" has "--yes"
  check "reset --yes" ws "$b" reset --yes
  ws "$b" stats
  check "  ... zeroes the statistics" has "Total syncs: 0"
  check "sync after reset" ws "$b" now
  check "  ... keeps the stories" lists "$b" one "Edited on B"

  # A wrong key is one clear error line and exit 1.
  ws "$b" config --key wrong-key
  check "wrong key fails" fails ws "$b" now
  check "  ... with the server's reason" bash -c 'grep -qiE "401|invalid API key|Authentication failed" "$1"' _ "$work/out"
}

for entry in "${scenarios[@]}"; do
  # shellcheck disable=SC2086
  run_scenario $entry
done

# status and stats never contact the server: they work with it gone.
kill "$server_pid"
wait "$server_pid" 2>/dev/null
if ((${#scenarios[@]})); then
  read -r name lua _ <<<"${scenarios[0]}"
  last_out="$work/out"
  (cd "$work/$name-a" && env -u WHISKER_CORE WHISKER_SYNC_LUA="$lua" "$root/bin/whisker-sync" status) \
    >"$work/out" 2>&1
  check "status with the server down" grep -q "Last sync: " "$work/out"
fi

echo "cli: $passed passed, $failed failed"
((failed == 0))
