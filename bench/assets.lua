--- Large stories and assets benchmark, one case per process (so the peak
-- memory read at the end belongs to that case), over loopback HTTP to the
-- reference server. bench/run-assets.sh runs every case with compression on
-- and off and prints the table of bench/assets.md.
--
--   lua5.4 bench/assets.lua <case> <server-url> <api-key> <on|off> <work-dir> [<asset-file>]
--
-- Cases: `idle` (the module loaded, nothing sent: baseline memory), `story`
-- (a 500-passage story: one device's first sync pushes it, a second
-- device's first sync pulls it), `asset` (put_asset of the file, then
-- get_asset into the work directory, checked by SHA-256).
--
-- Prints one line per measurement: case, compression, milliseconds, bytes
-- sent, bytes received (bodies as they crossed the network, after
-- compression), and the process's peak resident memory (VmHWM, KiB).

local SyncEngine = require("whisker.storage.sync.engine")
local HTTPTransport = require("whisker.storage.sync.transports.http")
local native = require("whisker.storage.sync.native")
local clock = native.websocket.clock

local case, url, key, compression, work, asset = arg[1], arg[2], arg[3], arg[4], arg[5], arg[6]
assert(case and url and key and compression and work, "usage: assets.lua <case> <url> <key> <on|off> <work> [file]")

--- Peak resident memory of this process, KiB.
local function peak_kib()
  local file = io.open("/proc/self/status", "r")
  if not file then
    return 0
  end
  local text = file:read("*a")
  file:close()
  return tonumber(text:match("VmHWM:%s*(%d+)")) or 0
end

local function report(name, seconds, traffic)
  print(("%s\t%s\t%.1f\t%d\t%d\t%d"):format(name, compression, seconds * 1000, traffic.sent, traffic.received,
    peak_kib()))
end

local function transport()
  return HTTPTransport.new({ base_url = url, api_key = key, timeout = 120, compression = compression == "on" })
end

local function delta(t, before)
  local now = t:get_traffic()
  return { sent = now.sent - before.sent, received = now.received - before.received }
end

local function storage()
  local s = { stories = {}, records = {} }
  function s:list_stories()
    local out = {}
    for id in pairs(self.stories) do
      out[#out + 1] = { id = id }
    end
    return out
  end
  function s:load_story(id) return self.stories[id] end
  function s:save_story(id, data) self.stories[id] = data; return true end
  function s:delete_story(id) self.stories[id] = nil; return true end
  s.backend = {
    load = function(_, k) return s.records[k] end,
    save = function(_, k, v) s.records[k] = v; return true end,
  }
  return s
end

--- Prose from a fixed vocabulary and a Park-Miller sequence: compresses
-- about as well as real writing (not a repeated sentence).
local WORDS = {
  "the", "lantern", "corridor", "rain", "door", "she", "opened", "slowly", "and", "beyond", "it", "a",
  "staircase", "wound", "down", "into", "dark", "where", "water", "dripped", "from", "old", "stone",
  "Mira", "listened", "for", "footsteps", "but", "heard", "only", "her", "own", "breath", "cold",
  "air", "smelled", "of", "salt", "iron", "forgotten", "letters", "map", "marked", "with", "red", "ink",
}
local seed = 42
local function word()
  seed = (seed * 16807) % 2147483647
  return WORDS[seed % #WORDS + 1]
end

local function passage_text(words)
  local out = {}
  for i = 1, words do
    out[i] = word()
  end
  return table.concat(out, " ") .. "."
end

--- A story of `n` passages of about 60 words each, with links and tags.
local function big_story(n)
  local passages = {}
  for p = 1, n do
    passages[p] = {
      id = "p" .. p,
      name = ("Passage %d"):format(p),
      text = passage_text(60),
      links = { { target = "p" .. (p % n + 1), label = passage_text(3) } },
      tags = { p % 7 == 0 and "chapter-start" or "scene" },
    }
  end
  return { title = "The Long Corridor", author = "Writer", start = "p1", passages = passages }
end

if case == "idle" then
  report("idle (module loaded)", 0, { sent = 0, received = 0 })
elseif case == "story" then
  local a_storage = storage()
  a_storage.stories.corridor = big_story(500)
  local size = #native.json.encode(a_storage.stories.corridor)
  io.stderr:write(("500-passage story: %d bytes of JSON\n"):format(size))
  local a = transport()
  local engine = SyncEngine.new({ storage = a_storage, transport = a, device_id = "laptop" })
  local before = a:get_traffic()
  local start = clock()
  assert(engine:sync_now())
  report("500-passage story: first sync, push", clock() - start, delta(a, before))

  local b = transport()
  local b_storage = storage()
  local other = SyncEngine.new({ storage = b_storage, transport = b, device_id = "desktop" })
  before = b:get_traffic()
  start = clock()
  assert(other:sync_now())
  report("500-passage story: second device, pull", clock() - start, delta(b, before))
  assert(b_storage.stories.corridor.passages[500].text == a_storage.stories.corridor.passages[500].text)
elseif case == "asset" then
  assert(asset, "asset case needs a file")
  local name = asset:match("([^/]+)$")
  local t = transport()
  assert(t:get_server_version("bench"))
  local before = t:get_traffic()
  local start = clock()
  local sha, up = t:put_asset(asset)
  assert(sha, up)
  report(name .. ": upload", clock() - start, delta(t, before))
  local dest = work .. "/" .. name .. ".copy"
  local down = transport()
  before = down:get_traffic()
  start = clock()
  assert(down:get_asset(sha, dest))
  report(name .. ": download", clock() - start, delta(down, before))
  assert(native.blob.sha256_file(dest) == sha, "downloaded copy differs")
  os.remove(dest)
else
  error("unknown case " .. tostring(case))
end
