--- Engine benchmark: initial, idle and incremental syncs of N stories, a
-- second device's first pull, and a 500-passage story edited on one device
-- and pulled by another, over loopback HTTP to
-- the reference server; plus the initial sync against an in-process server.
-- Runs whichever `whisker.storage.sync.engine` is first on the path.
--
--   lua5.4 bench/engine.lua <label> <server-url> <server-binary> <db>
--
-- Prints: label, case, N, wall milliseconds, bytes on the wire (request and
-- response bodies, as the transport's `_request` sees them).

local SyncEngine = require("whisker.storage.sync.engine")
local HTTPTransport = require("whisker.storage.sync.transports.http")
local clock = require("whisker_sync").websocket.clock

local label, url, binary, db = arg[1], arg[2], arg[3], arg[4]
local key_counter = 0

--- A fresh namespace (API key) on the server.
local function new_key()
  key_counter = key_counter + 1
  local key = ("bench-%s-%d-%d"):format(label, os.time(), key_counter)
  assert(os.execute(("%q keys add --key %q --db %q >/dev/null"):format(binary, key, db)))
  return key
end

local function mock_storage()
  local s = { data = {} }
  function s:list()
    local out = {}
    for id in pairs(self.data) do
      if id:sub(1, 1) ~= "_" then
        out[#out + 1] = { id = id, key = id }
      end
    end
    return out
  end
  function s:load(id) return self.data[id] end
  function s:save(id, data) self.data[id] = data end
  function s:delete(id) self.data[id] = nil end
  return s
end

--- About 2.5 KB of JSON.
local function story(i, passages, words)
  local list = {}
  for p = 1, passages do
    list[p] = { name = "Passage " .. p, text = ("Story %d passage %d. "):format(i, p):rep(words),
                links = { "Passage " .. (p % passages + 1) } }
  end
  return { title = "Story " .. i, author = "Writer", passages = list, tags = { "draft" } }
end

--- A transport counting the bytes of request and response bodies.
local function counted_transport(key)
  local transport = HTTPTransport.new({ base_url = url, api_key = key, timeout = 60 })
  local request = transport._request
  transport.bytes = 0
  transport._request = function(self, method, path, body)
    local result, err = request(self, method, path, body)
    self.bytes = self.bytes + (body and #body or 0) + (result and result.body and #result.body or 0)
    return result, err
  end
  return transport
end

local function device(name, key, storage)
  local transport = counted_transport(key)
  local engine = SyncEngine.new({ storage = storage or mock_storage(), transport = transport, device_id = name })
  return engine, transport
end

local function report(case, n, seconds, bytes)
  print(("%s\t%s\t%d\t%.1f\t%d"):format(label, case, n, seconds * 1000, bytes))
end

--- Runs one sync; returns its time and bytes.
local function sync_once(engine, transport)
  local before = transport.bytes
  local start = clock()
  local ok, err = engine:sync_now()
  local elapsed = clock() - start
  assert(ok, err)
  return elapsed, transport.bytes - before
end

--- Runs one sync and reports its time and bytes.
local function timed_sync(case, n, engine, transport)
  report(case, n, sync_once(engine, transport))
end

local function median(samples)
  table.sort(samples)
  return samples[math.ceil(#samples / 2)]
end

for _, n in ipairs({ 10, 100, 1000 }) do
  local key = new_key()
  local storage = mock_storage()
  for i = 1, n do
    storage.data["story-" .. i] = story(i, 6, 5)
  end
  local a, transport = device("bench-a", key, storage)
  timed_sync("initial sync", n, a, transport)
  timed_sync("idle sync", n, a, transport)
  local edited = story(1, 6, 5)
  edited.passages[3].text = "Rewritten passage."
  storage.data["story-1"] = edited
  timed_sync("incremental sync (1 edit)", n, a, transport)
  local b, b_transport = device("bench-b", key)
  timed_sync("second device first pull", n, b, b_transport)
end

-- This storage keeps the sync state through a `backend`, as whisker-core's
-- StorageService and the CLI's file store do: that is where the copy of a
-- long story as last synced lives, which an edit is sent as a patch against.
local function storage_with_backend()
  local storage = mock_storage()
  storage.backend = { records = {} }
  function storage.backend:load(name) return self.records[name] end
  function storage.backend:save(name, value) self.records[name] = value; return true end
  function storage.backend:delete(name) self.records[name] = nil; return true end
  return storage
end

local key = new_key()
local storage = storage_with_backend()
storage.data.epic = story(0, 500, 6)
local a, transport = device("bench-a", key, storage)
local b, b_transport = device("bench-b", key, storage_with_backend())
timed_sync("500-passage story, initial", 1, a, transport)
timed_sync("500-passage story, second device first pull", 1, b, b_transport)
-- One passage edited at a time, pushed by one device and pulled by the other:
-- medians of 15 (a single sync of this size varies too much on a shared VM).
local pushes, pulls, pushed, pulled = {}, {}, 0, 0
for i = 1, 15 do
  storage.data.epic.passages[i * 20].text = ("Passage rewritten, edit %d."):format(i)
  pushes[i], pushed = sync_once(a, transport)
  pulls[i], pulled = sync_once(b, b_transport)
end
report("500-passage story, one passage edited", 1, median(pushes), pushed)
report("500-passage story, second device pulls the edit", 1, median(pulls), pulled)

-- In-process: the whole initial sync of 1,000 stories against a server kept
-- in Lua (the old integration spec's shape), so no network is involved. One
-- sync is a few milliseconds, so it runs 9 times, each on a fresh device and
-- server after a full collection, and the median is reported.
local server
local in_process = {}
function in_process.fetch_operations(_, device_id, since)
  local ops = {}
  for _, op in ipairs(server.operations) do
    if op.version > since and op.device_id ~= device_id then
      ops[#ops + 1] = op
    end
  end
  return { operations = ops, version = server.version }
end
function in_process.push_operations(_, device_id, ops)
  for _, op in ipairs(ops) do
    server.version = server.version + 1
    op.version = server.version
    op.device_id = device_id
    server.operations[#server.operations + 1] = op
  end
  return { success = true, version = server.version, conflicts = {} }
end
local samples = {}
for run = 1, 9 do
  server = { operations = {}, version = 0 }
  local local_storage = mock_storage()
  for i = 1, 1000 do
    local_storage.data["story-" .. i] = story(i, 6, 5)
  end
  local engine = SyncEngine.new({ storage = local_storage, transport = in_process, device_id = "bench-a" .. run })
  collectgarbage()
  local start = clock()
  assert(engine:sync_now())
  samples[run] = clock() - start
end
report("initial sync, in-process server", 1000, median(samples), 0)
