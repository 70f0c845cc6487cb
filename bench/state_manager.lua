--- Benchmark: queueing operations one call at a time, with persistence.
--
-- Each saved table is encoded as JSON (as a file or database backend would
-- write it); the bytes of those encodings are "bytes written". Compares the
-- native state manager with the old pure-Lua one when WHISKER_CORE points at
-- a whisker-core checkout.
--
--   lua5.4 bench/state_manager.lua            (from the repository root,
--   WHISKER_CORE=/path/to/whisker-core lua5.4 bench/state_manager.lua   after `make build`)
--
-- Prints one Markdown table row per (implementation, N).

local root = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]+$") or "."
local flavour = type(jit) == "table" and "luajit" or ("lua" .. _VERSION:match("%d+%.%d+"))
package.path = root .. "/lua/?.lua;" .. package.path
package.cpath = root .. "/build/" .. flavour .. "/?.so;" .. package.cpath

local ok_cjson, cjson = pcall(require, "cjson")
local encode = ok_cjson and cjson.encode or require("whisker.storage.sync.native").json.encode
local clock = require("whisker.storage.sync.native").websocket.clock

--- A backend that keeps tables in memory and counts the JSON bytes of every save.
local function counting_storage()
  local storage = { data = {}, bytes = 0, saves = 0 }
  storage.backend = {
    load = function(_, key)
      return storage.data[key]
    end,
    save = function(_, key, data)
      storage.bytes = storage.bytes + #encode(data)
      storage.saves = storage.saves + 1
      storage.data[key] = data
      return true
    end,
    exists = function(_, key)
      return storage.data[key] ~= nil
    end,
  }
  return storage
end

local function operation(i)
  return {
    id = ("00000000-0000-4000-8000-%012d"):format(i),
    type = "update",
    story_id = "story-" .. (i % 50),
    data = { title = "Story " .. i, passages = { { name = "Start", text = "Once upon a time." } } },
    timestamp = 1700000000 + i,
    device_id = "3f2b8c1e-5d4a-4e6f-9a7b-0c1d2e3f4a5b",
  }
end

local function run(Manager, n)
  local storage = counting_storage()
  local mgr = Manager.new(storage)
  local bytes_before, saves_before = storage.bytes, storage.saves
  local last_bytes = 0
  local started = clock()
  for i = 1, n do
    local before = storage.bytes
    mgr:queue_operation(operation(i))
    last_bytes = storage.bytes - before
  end
  local elapsed = clock() - started
  assert(mgr:get_pending_count() == n, "queue lost operations")
  assert(Manager.new(storage):get_pending_count() == n, "queue not persisted")
  return {
    seconds = elapsed,
    bytes = storage.bytes - bytes_before,
    saves = storage.saves - saves_before,
    last_bytes = last_bytes,
  }
end

local implementations = {
  { name = "native", manager = require("whisker.storage.sync.state_manager") },
}
local core = os.getenv("WHISKER_CORE")
if core and core ~= "" then
  local chunk = assert(loadfile(core .. "/lib/whisker/storage/sync/state_manager.lua"))
  table.insert(implementations, { name = "old (whisker-core)", manager = chunk() })
end

local sizes = { 100, 1000, 5000 }
local results = {}
print(("%s, JSON via %s"):format(flavour, ok_cjson and "cjson" or "whisker_sync"))
print("| implementation | N | time (s) | bytes written | bytes per op | bytes for the N-th op | saves |")
print("|---|---:|---:|---:|---:|---:|---:|")
for _, impl in ipairs(implementations) do
  results[impl.name] = {}
  for _, n in ipairs(sizes) do
    collectgarbage()
    local r = run(impl.manager, n)
    results[impl.name][n] = r
    print(("| %s | %d | %.3f | %d | %.1f | %d | %d |"):format(
      impl.name, n, r.seconds, r.bytes, r.bytes / n, r.last_bytes, r.saves))
  end
end
local old = results["old (whisker-core)"]
if old then
  local n = sizes[#sizes]
  local new = results.native[n]
  print(("\nAt N = %d: %.0fx fewer bytes written, %.0fx less time than the old state manager."):format(
    n, old[n].bytes / new.bytes, old[n].seconds / new.seconds))
end
