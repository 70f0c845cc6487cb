--- Behaviour of the sync engine: storage and transport contracts, events,
-- failures that leave everything recoverable, conflicts, auto-sync, and real
-- syncs between devices through the reference server.

-- luacheck: ignore 212/self

local SyncEngine = require("whisker.storage.sync.engine")
local HTTPTransport = require("whisker.storage.sync.transports.http")
local WebSocketTransport = require("whisker.storage.sync.transports.websocket")
local StateManager = require("whisker.storage.sync.state_manager")
local reference_server = require("support.reference_server")

--- A storage with whisker-core StorageService's methods and events.
local function story_service()
  local service = { stories = {}, listeners = {}, clock = 1700000000, backend_data = {} }
  function service:on(event, fn)
    self.listeners[event] = self.listeners[event] or {}
    table.insert(self.listeners[event], fn)
  end
  function service:emit(event, data)
    for _, fn in ipairs(self.listeners[event] or {}) do
      fn(data)
    end
  end
  function service:list_stories()
    local out = {}
    for id, entry in pairs(self.stories) do
      out[#out + 1] = { id = id, title = entry.data.title, updated_at = entry.updated_at }
    end
    return out
  end
  function service:load_story(id)
    local entry = self.stories[id]
    if not entry then
      return nil, "Story not found"
    end
    return entry.data
  end
  function service:save_story(id, data)
    self.clock = self.clock + 1
    self.stories[id] = { data = data, updated_at = self.clock }
    self:emit("story_saved", { id = id, data = data })
    return true
  end
  function service:delete_story(id)
    if not self.stories[id] then
      return false, "Story not found"
    end
    self.stories[id] = nil
    self:emit("story_deleted", { id = id })
    return true
  end
  service.backend = {
    load = function(_, key) return service.backend_data[key] end,
    save = function(_, key, data) service.backend_data[key] = data; return true end,
    exists = function(_, key) return service.backend_data[key] ~= nil end,
    delete = function(_, key) service.backend_data[key] = nil; return true end,
  }
  function service:titles()
    local out = {}
    for id, entry in pairs(self.stories) do
      out[id] = entry.data.title
    end
    return out
  end
  return service
end

--- A transport that answers with what the test sets.
local function scripted_transport()
  local t = { remote = {}, pushed = {}, version = 0 }
  function t:fetch_operations(_, since)
    if self.fetch_error then
      return nil, self.fetch_error
    end
    local ops = self.remote
    self.remote = {}
    self.version = math.max(self.version, since) + #ops
    return { operations = ops, version = self.version, has_more = false }
  end
  function t:push_operations(_, ops)
    for _, op in ipairs(ops) do
      table.insert(self.pushed, op)
    end
    return self.push_result or { success = true, conflicts = {}, version = self.version }
  end
  return t
end

local function remote_op(id, op_type, story_id, data, timestamp)
  return { id = id, type = op_type, story_id = story_id, data = data,
           timestamp = timestamp or os.time(), device_id = "other-device" }
end

describe("sync engine", function()
  describe("storage", function()
    it("uses the StorageService methods and keeps sync records out of the stories", function()
      local storage = story_service()
      storage:save_story("s1", { title = "One" })
      local transport = scripted_transport()
      transport.remote = { remote_op("r1", "create", "s2", { title = "Two" }) }
      local engine = SyncEngine.new({ storage = storage, transport = transport, device_id = "me" })
      assert.is_true(engine:sync_now())
      assert.same({ s1 = "One", s2 = "Two" }, storage:titles())
      assert.equal(1, #transport.pushed)
      assert.equal("s1", transport.pushed[1].story_id)
      assert.equal("me", transport.pushed[1].device_id)
      assert.is_table(storage.backend_data._whisker_sync_state)
    end)

    it("pushes only what changed, and nothing when nothing did", function()
      local storage = story_service()
      for i = 1, 5 do
        storage:save_story("s" .. i, { title = "T" .. i })
      end
      local transport = scripted_transport()
      local engine = SyncEngine.new({ storage = storage, transport = transport })
      engine:sync_now()
      assert.equal(5, #transport.pushed)
      engine:sync_now()
      assert.equal(5, #transport.pushed)
      storage:save_story("s3", { title = "Edited" })
      engine:sync_now()
      assert.equal(6, #transport.pushed)
      assert.equal("update", transport.pushed[6].type)
      assert.equal("Edited", transport.pushed[6].data.title)
    end)

    it("reads ids under id or key, and lets listed tags choose the subset without loading", function()
      local loaded = {}
      local published, draft = { "published" }, { "draft" }
      local storage = { data = { a = { title = "A", tags = published }, b = { title = "B", tags = published },
                                 c = { title = "C", tags = draft } } }
      function storage:list()
        return { { id = "a", tags = published },
                 { key = "b", tags = published, updated_at = 1700000000.5 },
                 { id = "c", tags = draft } }
      end
      function storage:load(id)
        loaded[id] = true
        return self.data[id]
      end
      function storage:save(id, data) self.data[id] = data end
      function storage:delete(id) self.data[id] = nil end
      local transport = scripted_transport()
      local engine = SyncEngine.new({ storage = storage, transport = transport, device_id = "laptop",
                                      selective = { tags = { "published" } } })
      assert(engine:sync_now())
      local pushed = {}
      for _, op in ipairs(transport.pushed) do
        pushed[#pushed + 1] = op.story_id
      end
      table.sort(pushed)
      assert.same({ "a", "b" }, pushed)
      assert.is_nil(loaded.c)
    end)

    it("turns a local delete into a tombstone", function()
      local storage = story_service()
      storage:save_story("s1", { title = "Doomed" })
      local transport = scripted_transport()
      local engine = SyncEngine.new({ storage = storage, transport = transport })
      engine:sync_now()
      storage:delete_story("s1")
      engine:sync_now()
      local last = transport.pushed[#transport.pushed]
      assert.equal("delete", last.type)
      assert.equal("s1", last.story_id)
      assert.is_number(last.base_version)
    end)

    it("reports a storage that raises, and recovers on the next sync", function()
      local storage = story_service()
      local transport = scripted_transport()
      transport.remote = { remote_op("r1", "create", "s1", { title = "Remote" }) }
      local real_save = storage.save_story
      storage.save_story = function() error("disk full") end
      local engine = SyncEngine.new({ storage = storage, transport = transport })
      local ok, err = engine:sync_now()
      assert.is_false(ok)
      assert.matches("storage save_story raised an error: .*disk full", err)
      assert.equal("error", engine:get_sync_status())
      storage.save_story = real_save
      transport.remote = { remote_op("r1", "create", "s1", { title = "Remote" }) }
      assert.is_true(engine:sync_now())
      assert.same({ s1 = "Remote" }, storage:titles())
      assert.equal("idle", engine:get_sync_status())
    end)

    it("says which story cannot be synced", function()
      local storage = story_service()
      storage:save_story("s1", { title = "T", on_enter = function() end })
      local engine = SyncEngine.new({ storage = storage, transport = scripted_transport() })
      local ok, err = engine:sync_now()
      assert.is_false(ok)
      assert.equal("story 's1' cannot be synced: a function value cannot be synced at on_enter", err)
    end)
  end)

  describe("untrusted remote data", function()
    it("rejects a story id that would escape the storage folder and applies nothing", function()
      local storage = story_service()
      local transport = scripted_transport()
      transport.remote = {
        remote_op("r1", "create", "fine", { title = "Fine" }),
        remote_op("r2", "create", "../../etc/passwd", { title = "Evil" }),
      }
      local engine = SyncEngine.new({ storage = storage, transport = transport })
      local ok, err = engine:sync_now()
      assert.is_false(ok)
      assert.equal("invalid operation from server: operation 2: "
        .. 'story id "../../etc/passwd" contains a path separator or \'..\'', err)
      assert.same({}, storage:titles())
    end)

    it("rejects malformed operations", function()
      local transport = scripted_transport()
      transport.remote = { { id = "x", type = "update", story_id = "s1", data = "not a story", timestamp = 1 } }
      local ok, err = SyncEngine.new({ storage = story_service(), transport = transport }):sync_now()
      assert.is_false(ok)
      assert.equal("invalid operation from server: operation 1: data must be a table", err)
    end)
  end)

  describe("transport failures", function()
    it("return the transport's message and keep local edits queued", function()
      local storage = story_service()
      storage:save_story("s1", { title = "Offline edit" })
      local transport = scripted_transport()
      transport.fetch_error = "connection refused to http://127.0.0.1:9/operations"
      local state = StateManager.new(storage)
      local engine = SyncEngine.new({ storage = storage, transport = transport, state_manager = state })
      local failed
      engine:on("sync_failed", function(data) failed = data end)
      local ok, err = engine:sync_now()
      assert.is_false(ok)
      assert.equal("connection refused to http://127.0.0.1:9/operations", err)
      assert.equal(err, failed.error)
      assert.equal(1, state:get_pending_count())
      assert.equal(err, state:get_last_error().message)
      transport.fetch_error = nil
      assert.is_true(engine:sync_now())
      assert.equal(0, state:get_pending_count())
      assert.equal("Offline edit", transport.pushed[1].data.title)
      assert.is_nil(state:get_last_error())
    end)

    it("keeps operations queued when the server refuses a push", function()
      local storage = story_service()
      storage:save_story("s1", { title = "T" })
      local transport = scripted_transport()
      transport.push_result = { success = false, conflicts = {}, version = 0 }
      local state = StateManager.new(storage)
      local engine = SyncEngine.new({ storage = storage, transport = transport, state_manager = state })
      local ok, err = engine:sync_now()
      assert.is_false(ok)
      assert.equal("server rejected the push without reporting conflicts", err)
      assert.equal(1, state:get_pending_count())
    end)

    it("succeeds without a transport but does not claim to have synced", function()
      local engine = SyncEngine.new({ storage = story_service() })
      assert.is_true(engine:sync_now())
      assert.equal(0, engine:get_last_sync_time())
    end)
  end)

  describe("events", function()
    it("reports progress with item counts, then completion with figures", function()
      local storage = story_service()
      storage:save_story("s1", { title = "T" })
      local engine = SyncEngine.new({ storage = storage, transport = scripted_transport() })
      local seen, completed = {}, nil
      engine:on("sync_progress", function(p) seen[#seen + 1] = p end)
      engine:on("sync_completed", function(data) completed = data end)
      engine:sync_now()
      assert.equal("starting", seen[1].operation)
      assert.equal(0, seen[1].current)
      assert.equal("complete", seen[#seen].operation)
      assert.equal(100, seen[#seen].current)
      for _, p in ipairs(seen) do
        assert.is_number(p.items_done)
        assert.is_number(p.items_total)
      end
      assert.equal(1, completed.operations_pushed)
      -- Bytes come from the transport's own counters; this one has none.
      assert.equal(0, completed.bytes_sent)
    end)

    it("survives a failing listener", function()
      local storage = story_service()
      local engine = SyncEngine.new({ storage = storage, transport = scripted_transport() })
      local after = false
      engine:on("sync_completed", function() error("listener bug") end)
      engine:on("sync_completed", function() after = true end)
      assert.is_true(engine:sync_now())
      assert.is_true(after)
    end)

    it("lets an interrupt (Ctrl-C) through instead of reporting a failed sync", function()
      local storage = story_service()
      storage:save_story("s1", { title = "T" })
      local engine = SyncEngine.new({ storage = storage, transport = scripted_transport() })
      local interrupt = true
      engine:on("sync_progress", function()
        if interrupt then
          interrupt = false
          error("interrupted!")
        end
      end)
      assert.has_error(function() engine:sync_now() end, "interrupted!")
      assert.equal("idle", engine:get_sync_status())
      assert.is_true(engine:sync_now())
    end)

    it("refuses to sync inside a sync", function()
      local engine = SyncEngine.new({ storage = story_service(), transport = scripted_transport() })
      local nested
      engine:on("sync_progress", function()
        if nested == nil then
          nested = { engine:sync_now() }
        end
      end)
      engine:sync_now()
      assert.same({ false, "Sync already in progress" }, nested)
    end)
  end)

  describe("conflicts", function()
    local function conflicting(config)
      local storage = story_service()
      local transport = scripted_transport()
      config.storage, config.transport = storage, transport
      local engine = SyncEngine.new(config)
      storage:save_story("s1", { title = "Base", body = "b" })
      engine:sync_now()
      transport.pushed[1].version = 1
      storage:save_story("s1", { title = "Local", body = "b" })
      transport.remote = { { id = "r1", type = "update", story_id = "s1", data = { title = "Base", body = "Remote" },
                             timestamp = os.time() + 5, device_id = "other", version = 2 } }
      return engine, storage, transport
    end

    it("merges edits to different fields under auto_merge", function()
      local engine, storage = conflicting({ conflict_strategy = "auto_merge" })
      local detected
      engine:on("conflict_detected", function(data) detected = data end)
      assert.is_true(engine:sync_now())
      assert.same({ title = "Local", body = "Remote" }, storage.stories.s1.data)
      assert.equal("merged", detected.resolution.winner)
      assert.is_true(detected.auto_resolved)
      assert.equal("s1", detected.conflict.story_id)
    end)

    it("keeps both versions under keep_both", function()
      local engine, storage = conflicting({ conflict_strategy = "keep_both" })
      assert.is_true(engine:sync_now())
      local titles = {}
      for _, entry in pairs(storage.stories) do
        titles[#titles + 1] = entry.data.title
      end
      table.sort(titles)
      assert.same({ "Base", "Local" }, titles)
    end)

    it("accepts a resolver that returns the story itself", function()
      local engine, storage = conflicting({
        conflict_strategy = "manual",
        on_conflict = function(c)
          return { title = c.local_version.data.title .. "+" .. c.remote_version.data.body }
        end,
      })
      assert.is_true(engine:sync_now())
      assert.same({ title = "Local+Remote" }, storage.stories.s1.data)
    end)

    it("leaves a conflict for the user when there is no resolver", function()
      local engine, storage, transport = conflicting({ conflict_strategy = "manual" })
      local completed
      engine:on("sync_completed", function(data) completed = data end)
      assert.is_true(engine:sync_now())
      assert.equal(0, completed.conflicts_resolved)
      assert.equal(1, completed.conflicts_pending)
      assert.equal("Local", storage.stories.s1.data.title)
      local pending = engine:get_conflicts()
      assert.equal(1, #pending)
      assert.equal("s1", pending[1].story_id)
      assert.equal("Remote", pending[1].remote.data.body)
      local before = #transport.pushed
      engine:sync_now()
      assert.equal(before, #transport.pushed)
      assert.is_true(engine:resolve_conflict("s1", "remote"))
      assert.equal("Remote", storage.stories.s1.data.body)
      assert.same({}, engine:get_conflicts())
      local ok, err = engine:resolve_conflict("s1", "remote")
      assert.is_nil(ok)
      assert.equal('no unresolved conflict for story "s1"', err)
    end)

    it("rejects a malformed subset", function()
      assert.has_error(function() SyncEngine.new({ selective = { stories = "chapter-*" } }) end,
        "selective.stories must be a list of strings")
    end)

    it("rejects an unknown strategy", function()
      assert.has_error(function() SyncEngine.new({ conflict_strategy = "coin_flip" }) end,
        "Unknown conflict strategy: coin_flip")
    end)
  end)

  describe("auto-sync", function()
    it("syncs again when the interval elapses, driven by step and wait", function()
      local storage = story_service()
      local transport = scripted_transport()
      local engine = SyncEngine.new({ storage = storage, transport = transport, sync_interval = 200 })
      local syncs = 0
      engine:on("sync_completed", function() syncs = syncs + 1 end)
      engine:start_sync()
      assert.equal(1, syncs)
      assert.is_false(engine:step())
      storage:save_story("later", { title = "Later" })
      engine:wait(2)
      assert.is_true(engine:step())
      assert.equal(2, syncs)
      assert.equal("later", transport.pushed[1].story_id)
      engine:stop_sync()
      assert.is_false(engine:step())
    end)
  end)
end)

describe("syncing through the reference server", function()
  local server = reference_server.each_test()

  local function device(name, strategy)
    local storage = story_service()
    local transport = HTTPTransport.new({ base_url = server.url, api_key = server.api_key, timeout = 5 })
    local state = StateManager.new(storage)
    local engine = SyncEngine.new({ storage = storage, transport = transport, state_manager = state,
                                    device_id = name, conflict_strategy = strategy })
    return { storage = storage, engine = engine, state = state }
  end

  it("carries creates, edits, deletes and a conflict between two devices", function()
    local a, b = device("laptop"), device("desktop")
    a.storage:save_story("s1", { title = "One" })
    a.storage:save_story("s2", { title = "Two" })
    assert(a.engine:sync_now())
    assert(b.engine:sync_now())
    assert.same({ s1 = "One", s2 = "Two" }, b.storage:titles())

    b.storage:save_story("s1", { title = "One, edited on the desktop" })
    a.storage:delete_story("s2")
    assert(b.engine:sync_now())
    assert(a.engine:sync_now())
    assert(b.engine:sync_now())
    assert.same({ s1 = "One, edited on the desktop" }, a.storage:titles())
    assert.same(a.storage:titles(), b.storage:titles())

    a.storage:save_story("s1", { title = "Laptop's version" })
    b.storage:save_story("s1", { title = "Desktop's version" })
    assert(a.engine:sync_now())
    assert(b.engine:sync_now())
    assert(a.engine:sync_now())
    assert.same(a.storage:titles(), b.storage:titles())
    assert.equal(1, b.state:get_stats().conflicts_resolved)
    assert.equal(0, a.state:get_pending_count())
    assert.equal(0, b.state:get_pending_count())
  end)

  it("sends almost nothing when nothing changed", function()
    local a = device("laptop")
    for i = 1, 50 do
      a.storage:save_story("s" .. i, { title = ("Story %d"):format(i), text = ("x"):rep(500) })
    end
    assert(a.engine:sync_now())
    local before = a.state:get_stats()
    -- Wire bytes: the push went gzip-compressed (25 KB of JSON in under 2 KB).
    assert.is_true(before.bandwidth_sent_bytes > 50 * 20)
    assert(a.engine:sync_now())
    local after = a.state:get_stats()
    assert.equal(before.bandwidth_sent_bytes, after.bandwidth_sent_bytes)
    assert.is_true(after.bandwidth_received_bytes - before.bandwidth_received_bytes < 1024)
  end)

  it("syncs only the chosen subset, and widening it fetches the rest", function()
    local a = device("laptop")
    a.storage:save_story("chapter-1", { title = "One" })
    a.storage:save_story("intro", { title = "Intro", tags = { "published" } })
    a.storage:save_story("notes", { title = "Notes" })
    assert(a.engine:sync_now())
    local storage = story_service()
    local function engine_with(selective)
      return SyncEngine.new({ storage = storage, device_id = "desktop", selective = selective,
        transport = HTTPTransport.new({ base_url = server.url, api_key = server.api_key, timeout = 5 }) })
    end
    assert(engine_with({ stories = { "chapter-*" } }):sync_now())
    assert.same({ ["chapter-1"] = "One" }, storage:titles())
    storage:save_story("scratch", { title = "Only here" })
    assert(engine_with({ stories = { "chapter-*" }, tags = { "published" } }):sync_now())
    assert.same({ ["chapter-1"] = "One", intro = "Intro", scratch = "Only here" }, storage:titles())
    assert(a.engine:sync_now())
    assert.is_nil(a.storage:titles().scratch)
  end)

  --- A long story whose passages hold text that does not compress well, so
  -- the bytes on the wire show what was sent.
  local function epic(passages)
    local seed = 42
    local list = {}
    for p = 1, passages do
      local letters = {}
      for i = 1, 150 do
        seed = (seed * 16807) % 2147483647
        letters[i] = string.char(97 + seed % 26)
      end
      list[p] = { name = "Passage " .. p, text = table.concat(letters) }
    end
    return { title = "Epic", passages = list }
  end

  --- Bytes `peer` counted under `stat` while `fn` ran.
  local function bytes_during(peer, stat, fn)
    local before = peer.state:get_stats()[stat]
    fn()
    return peer.state:get_stats()[stat] - before
  end

  local function sent_by(peer, fn)
    return bytes_during(peer, "bandwidth_sent_bytes", fn)
  end

  local function received_by(peer, fn)
    return bytes_during(peer, "bandwidth_received_bytes", fn)
  end

  it("moves only the edited passage of a long story, both ways", function()
    local a, b = device("laptop"), device("desktop")
    a.storage:save_story("epic", epic(300))
    local whole = sent_by(a, function() assert(a.engine:sync_now()) end)
    local first_pull = received_by(b, function() assert(b.engine:sync_now()) end)

    local story = a.storage:load_story("epic")
    story.passages[150].text = "One passage rewritten."
    a.storage:save_story("epic", story)
    local edit = sent_by(a, function() assert(a.engine:sync_now()) end)
    assert.is_true(whole > 20000, "whole story: " .. whole .. " bytes")
    assert.is_true(edit < 1024, "one passage: " .. edit .. " bytes")

    local pulled = received_by(b, function() assert(b.engine:sync_now()) end)
    assert.is_true(first_pull > 20000, "first pull: " .. first_pull .. " bytes")
    assert.is_true(pulled < 1024, "edited passage pulled: " .. pulled .. " bytes")
    assert.equal("One passage rewritten.", b.storage:load_story("epic").passages[150].text)
    assert.same(a.storage:load_story("epic"), b.storage:load_story("epic"))
    assert.equal(0, a.state:get_pending_count())
  end)

  it("moves patches over WebSocket too", function()
    local storage = story_service()
    local ws = WebSocketTransport.new({ ws_url = server.ws_url, api_key = server.api_key, device_id = "tablet" })
    local state = StateManager.new(storage)
    local tablet = { storage = storage, state = state,
                     engine = SyncEngine.new({ storage = storage, transport = ws, state_manager = state,
                                               device_id = "tablet" }) }
    local laptop = device("laptop")
    storage:save_story("epic", epic(300))
    assert(tablet.engine:sync_now())
    assert(laptop.engine:sync_now())

    local story = storage:load_story("epic")
    table.insert(story.passages, 10, { name = "New passage", text = "Inserted." })
    storage:save_story("epic", story)
    local edit = sent_by(tablet, function() assert(tablet.engine:sync_now()) end)
    assert.is_true(edit < 1024, "one inserted passage: " .. edit .. " bytes")
    assert(laptop.engine:sync_now())
    assert.same(story, laptop.storage:load_story("epic"))

    -- Offline while the laptop edits: a connected socket would also get the
    -- change live, as a whole remote_change.
    ws:disconnect()
    local edited = laptop.storage:load_story("epic")
    edited.passages[200].text = "Rewritten on the laptop."
    laptop.storage:save_story("epic", edited)
    assert(laptop.engine:sync_now())
    local pulled = received_by(tablet, function() assert(tablet.engine:sync_now()) end)
    ws:disconnect()
    assert.is_true(pulled > 0 and pulled < 1024, "one passage pulled: " .. pulled .. " bytes")
    assert.same(edited, storage:load_story("epic"))
  end)

  it("applies a change pushed over WebSocket within a second", function()
    local a = device("laptop")
    local storage = story_service()
    local ws = WebSocketTransport.new({ ws_url = server.ws_url, api_key = server.api_key, device_id = "desktop" })
    local b = SyncEngine.new({ storage = storage, transport = ws, device_id = "desktop", sync_interval = 60000 })
    b:start_sync()
    a.storage:save_story("live", { title = "Pushed" })
    assert(a.engine:sync_now())
    local started = os.time()
    local synced = false
    while not synced and os.time() - started < 3 do
      b:wait(0.2)
      synced = b:step()
    end
    b:stop_sync()
    ws:disconnect()
    assert.is_true(synced)
    assert.same({ live = "Pushed" }, storage:titles())
  end)
end)
