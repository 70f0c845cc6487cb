#!/usr/bin/env bash
# Interop check: whisker-core's original Lua HTTP transport
# (lib/whisker/storage/sync/transports/http.lua, unchanged, loaded from a
# whisker-core checkout) pushes, fetches and reads the version against our
# whisker-sync-server on loopback.
#
#   WHISKER_CORE=/path/to/whisker-core scripts/interop-old-client.sh
#
# Without WHISKER_CORE it says so and exits 0. Needs lua5.4 with luasocket and
# lua-cjson (Debian: lua5.4 lua-socket lua-cjson). WHISKER_SYNC_SERVER may
# point at a prebuilt server binary; otherwise it is built with cargo.
set -euo pipefail

if [ -z "${WHISKER_CORE:-}" ]; then
    echo "interop-old-client: WHISKER_CORE is not set; skipping (set it to a whisker-core checkout to run the old Lua HTTP transport against whisker-sync-server)"
    exit 0
fi
transport="$WHISKER_CORE/lib/whisker/storage/sync/transports/http.lua"
if [ ! -f "$transport" ]; then
    echo "interop-old-client: $transport not found; WHISKER_CORE must be a whisker-core checkout" >&2
    exit 1
fi
if ! command -v lua5.4 >/dev/null; then
    echo "interop-old-client: lua5.4 is missing (Debian package lua5.4)" >&2
    exit 1
fi
if ! lua5.4 -e 'require "socket.http"; require "cjson"' 2>/dev/null; then
    echo "interop-old-client: Lua 5.4 needs luasocket and lua-cjson (Debian packages lua-socket lua-cjson)" >&2
    exit 1
fi

root=$(cd "$(dirname "$0")/.." && pwd)
server=${WHISKER_SYNC_SERVER:-}
if [ -z "$server" ]; then
    target=${CARGO_TARGET_DIR:-$root/target}
    (cd "$root" && cargo build -q -p sync-server --bin whisker-sync-server --target-dir "$target")
    server=$target/debug/whisker-sync-server
fi

work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

key=$("$server" keys add interop --db "$work/sync.db" | tail -n 1)
"$server" serve --db "$work/sync.db" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.log" &
pid=$!
url=
for _ in $(seq 1 200); do
    url=$(sed -n 's/^listening on //p' "$work/server.out" | head -n 1)
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "interop-old-client: the server did not start:" >&2
    cat "$work/server.log" >&2
    exit 1
fi
echo "interop-old-client: old Lua HTTP transport from $WHISKER_CORE against $url"

status=0
lua5.4 - "$url" "$key" <<'LUA' || status=$?
local lib = os.getenv("WHISKER_CORE") .. "/lib/"
package.path = lib .. "?.lua;" .. lib .. "?/init.lua;" .. package.path
local HTTPTransport = require("whisker.storage.sync.transports.http")
local url, key = arg[1], arg[2]

local failures = 0
local function check(ok, what, detail)
  if ok then
    print("  ok    " .. what)
  else
    failures = failures + 1
    print("  FAIL  " .. what .. (detail and (": " .. tostring(detail)) or ""))
  end
end

local transport = HTTPTransport.new({ base_url = url, api_key = key, timeout = 5, max_retries = 0 })
local now = os.time()
local ops = {
  { id = "interop-op-1", type = "create", story_id = "interop-story",
    data = { title = "Written by the old client", passages = { { name = "start", text = "Hello" } } },
    metadata = {}, timestamp = now, device_id = "old-lua-a" },
  { id = "interop-op-2", type = "update", story_id = "interop-story",
    data = { title = "Edited by the old client" }, metadata = {}, timestamp = now + 1, device_id = "old-lua-a" },
  { id = "interop-op-3", type = "create", story_id = "second-story",
    data = { title = "Second" }, metadata = {}, timestamp = now, device_id = "old-lua-a" },
}

local pushed, err = transport:push_operations("old-lua-a", ops)
check(pushed and pushed.success == true, "push is accepted", err)
check(pushed and pushed.version == 3, "push answers the new version", pushed and pushed.version)
check(pushed and type(pushed.conflicts) == "table" and #pushed.conflicts == 0, "push has no conflicts")

local empty, err_empty = transport:push_operations("old-lua-a", {})
check(empty and empty.success == true and empty.version == 3, "an empty push ({} from cjson) is accepted", err_empty)

local fetched, err_fetch = transport:fetch_operations("old-lua-b", 0)
check(fetched ~= nil, "another device fetches", err_fetch)
if fetched then
  local titles = {}
  for _, op in ipairs(fetched.operations) do titles[op.story_id] = op.data and op.data.title end
  check(#fetched.operations == 2, "it gets each story's latest operation", #fetched.operations)
  check(titles["interop-story"] == "Edited by the old client", "with the latest content", titles["interop-story"])
  check(fetched.version == 3 and fetched.has_more == false, "and the version to resume from", fetched.version)
end

local own = transport:fetch_operations("old-lua-a", 0)
check(own and #own.operations == 0 and own.version == 3, "the pushing device gets nothing back, version still 3")

local later = transport:fetch_operations("old-lua-b", 3)
check(later and #later.operations == 0 and later.version == 3, "fetching from the current version is empty")

local version, err_version = transport:get_server_version("old-lua-a")
check(version and version.version == 3, "get_server_version", err_version)

local again = transport:push_operations("old-lua-a", ops)
check(again and again.success == true and again.version == 3, "re-sending the push stores nothing")

local deleted = transport:push_operations("old-lua-b", {
  { id = "interop-op-4", type = "delete", story_id = "second-story", metadata = {}, timestamp = now + 2, device_id = "old-lua-b" },
})
check(deleted and deleted.version == 4, "a delete is accepted")
local seen = transport:fetch_operations("old-lua-a", 3)
check(seen and #seen.operations == 1 and seen.operations[1].type == "delete", "and reaches the other device")

local wrong = HTTPTransport.new({ base_url = url, api_key = "not-a-real-key-123", timeout = 5, max_retries = 0 })
local none, err_wrong = wrong:fetch_operations("old-lua-a", 0)
check(none == nil and tostring(err_wrong):match("401") ~= nil, "a wrong key is refused with 401", err_wrong)

print(failures == 0 and "interop: all checks passed" or ("interop: " .. failures .. " check(s) failed"))
os.exit(failures == 0 and 0 or 1)
LUA
if [ "$status" -ne 0 ]; then
    echo "--- server log ---" >&2
    cat "$work/server.log" >&2
fi
exit "$status"
