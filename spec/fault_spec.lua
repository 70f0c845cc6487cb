--- Faults at the Lua edge, against the real reference server: storage
-- callbacks that raise or return garbage, a state backend that fails or holds
-- garbage, transports that raise or answer garbage, the server going away
-- (HTTP and WebSocket). Each time `sync_now` returns false and a message that
-- names the cause, the Lua state keeps working, no edit is lost, queued edits
-- stay queued, and the next syncs converge with a second device. The API key
-- never shows in an error or in the persisted state.

-- luacheck: ignore 212/self

local SyncEngine = require("whisker.storage.sync.engine")
local HTTPTransport = require("whisker.storage.sync.transports.http")
local WebSocketTransport = require("whisker.storage.sync.transports.websocket")
local StateManager = require("whisker.storage.sync.state_manager")
local reference_server = require("support.reference_server")
local story_service = require("support.story_service").new

--- Titles by story id.
local function titles(storage)
  local out = {}
  for id, story in pairs(storage.stories) do
    out[id] = story.title
  end
  return out
end

--- Whether `needle` occurs in any string inside `value` (keys included).
local function mentions(value, needle, seen)
  seen = seen or {}
  if type(value) == "string" then
    return value:find(needle, 1, true) ~= nil
  end
  if type(value) ~= "table" or seen[value] then
    return false
  end
  seen[value] = true
  for k, v in pairs(value) do
    if mentions(k, needle, seen) or mentions(v, needle, seen) then
      return true
    end
  end
  return false
end

--- The Lua state still works: allocation, collection, strings, closures.
local function assert_lua_state_works()
  collectgarbage()
  local t = {}
  for i = 1, 1000 do
    t[i] = ("%d"):format(i)
  end
  assert.equal("1000", t[1000])
  assert.equal(3, select("#", pcall(function() return 1, 2 end)))
end

describe("faults at the Lua edge", function()
  local devices

  before_each(function()
    devices = {}
  end)

  -- Registered before the server's hooks, so transports disconnect while it
  -- still runs.
  after_each(function()
    for _, d in ipairs(devices) do
      if d.transport.disconnect then
        d.transport:disconnect()
      end
    end
  end)

  local server = reference_server.each_test()

  local function device(name, kind)
    local storage = story_service()
    local transport
    if kind == "websocket" then
      transport = WebSocketTransport.new({ ws_url = server.ws_url, api_key = server.api_key,
                                           device_id = name, response_timeout = 2,
                                           max_reconnect_delay = 1 })
    else
      transport = HTTPTransport.new({ base_url = server.url, api_key = server.api_key,
                                      timeout = 2, max_retries = 0 })
    end
    local state = StateManager.new(storage)
    local engine = SyncEngine.new({ storage = storage, transport = transport, state_manager = state,
                                    device_id = name })
    local d = { storage = storage, transport = transport, state = state, engine = engine }
    devices[#devices + 1] = d
    return d
  end

  --- Two devices that synced a's s1, s2 and b's t1, t2; then a edits s1,
  -- creates s3 and deletes s2, b edits t1 and deletes t2 and syncs.
  local function scene(kind)
    local a, b = device("laptop", kind), device("desktop")
    a.storage:save_story("s1", { title = "one" })
    a.storage:save_story("s2", { title = "two" })
    b.storage:save_story("t1", { title = "t-one" })
    b.storage:save_story("t2", { title = "t-two" })
    assert(a.engine:sync_now())
    assert(b.engine:sync_now())
    assert(a.engine:sync_now())
    a.storage:save_story("s1", { title = "one, edited" })
    a.storage:save_story("s3", { title = "three" })
    a.storage:delete_story("s2")
    b.storage:save_story("t1", { title = "t-one, edited" })
    b.storage:delete_story("t2")
    assert(b.engine:sync_now())
    return a, b
  end

  local expected = { s1 = "one, edited", s3 = "three", t1 = "t-one, edited" }

  --- a's sync fails with a message matching `pattern`; nothing is lost.
  local function fails_cleanly(a, pattern)
    local queued = a.state:get_pending_count()
    local ok, err = a.engine:sync_now()
    assert.is_false(ok)
    assert.is_string(err)
    assert.matches(pattern, err)
    assert.is_false(mentions(err, server.api_key))
    assert.equal("error", a.engine:get_sync_status())
    assert.equal(err, a.state:get_last_error().message)
    assert_lua_state_works()
    assert.is_true(a.state:get_pending_count() >= queued)
    return err
  end

  --- a still holds its edits; after the fault is gone everyone converges.
  local function recovers(a, b)
    assert.same({ title = "one, edited" }, a.storage.stories.s1)
    assert.same({ title = "three" }, a.storage.stories.s3)
    assert.is_nil(a.storage.stories.s2)
    for _ = 1, 2 do
      assert(a.engine:sync_now())
      assert(b.engine:sync_now())
    end
    assert.same(expected, titles(a.storage))
    assert.same(expected, titles(b.storage))
    assert.equal(0, a.state:get_pending_count())
    assert.equal(0, b.state:get_pending_count())
    assert.is_false(mentions(a.storage.backend_data, server.api_key))
  end

  -- Storage faults: `arm(storage)` breaks one method and returns a function
  -- that repairs it; `queued` says whether a's edits were queued before it.
  local storage_faults = {
    { "list_stories raises", "storage list_stories raised an error: .*index is corrupt", false,
      function(s) s.list_stories = function() error("index is corrupt") end end },
    { "list_stories returns a string", "storage list_stories returned a string, not a list of stories", false,
      function(s) s.list_stories = function() return "garbage" end end },
    { "list_stories returns a number", "storage list_stories returned a number, not a list of stories", false,
      function(s) s.list_stories = function() return 42 end end },
    { "list_stories returns nil", "storage list_stories returned nil, not a list of stories", false,
      function(s) s.list_stories = function() return nil end end },
    { "list_stories returns entries that are not stories",
      "storage list_stories returned an entry without an id %(entry 1: a number%)", false,
      function(s) s.list_stories = function() return { 1, 2, "x" } end end },
    { "list_stories returns nil and a message", "storage list_stories failed: disk unreadable", false,
      function(s) s.list_stories = function() return nil, "disk unreadable" end end },
    { "load_story raises", "storage load_story raised an error: .*read error", false,
      function(s) s.load_story = function() error("read error") end end },
    { "load_story returns a number", "storage load_story%('[%w]+'%) returned a number, not a story table", false,
      function(s) s.load_story = function() return 7 end end },
    { "load_story returns a story holding a function", "story 's1' cannot be synced", false,
      function(s)
        local load = s.load_story
        s.load_story = function(self, id)
          local story = load(self, id)
          if id == "s1" and story then
            return { title = story.title, callback = print }
          end
          return story
        end
      end },
    { "load_story returns a cyclic table", "story 's1' cannot be synced", false,
      function(s)
        local load = s.load_story
        s.load_story = function(self, id)
          local story = load(self, id)
          if id == "s1" and story then
            local cyclic = { title = story.title }
            cyclic.self = cyclic
            return cyclic
          end
          return story
        end
      end },
    { "save_story raises while a remote change is applied",
      "storage save_story raised an error: .*no space left", true,
      function(s) s.save_story = function() error("no space left") end end },
    { "save_story returns false and a message", "storage save_story%('t1'%) failed: disk full", true,
      function(s) s.save_story = function() return false, "disk full" end end },
    { "delete_story raises while a remote delete is applied",
      "storage delete_story raised an error: .*permission denied", true,
      function(s) s.delete_story = function() error("permission denied") end end },
  }

  for _, case in ipairs(storage_faults) do
    local name, pattern, queued, arm = case[1], case[2], case[3], case[4]
    it("survives a storage whose " .. name, function()
      local a, b = scene()
      local saved = {}
      for k, v in pairs(a.storage) do
        saved[k] = v
      end
      arm(a.storage)
      fails_cleanly(a, pattern)
      if queued then
        assert.is_true(a.state:get_pending_count() >= 3)
      end
      for k, v in pairs(saved) do
        a.storage[k] = v
      end
      -- Garbage from the storage must not have become deletes on b.
      assert(b.engine:sync_now())
      assert.same({ s1 = "one", s2 = "two", t1 = "t-one, edited" }, titles(b.storage))
      recovers(a, b)
    end)
  end

  it("survives a state backend that raises, refuses, or returns garbage", function()
    local a, b = scene()
    local backend = a.storage.backend
    local save = backend.save
    backend.save = function() error("state disk full") end
    fails_cleanly(a, "state disk full")
    backend.save = function() return false, "read-only file system" end
    fails_cleanly(a, "read%-only file system")
    backend.save = save
    recovers(a, b)

    -- A state record replaced by garbage is reported and reset to defaults;
    -- the edits are in the stories, so the next syncs still converge.
    a.storage:save_story("s3", { title = "three, again" })
    a.storage.backend_data._whisker_sync_state = "garbage"
    local state = StateManager.new(a.storage)
    assert.matches("not a sync state", state:get_last_error().message)
    local engine = SyncEngine.new({ storage = a.storage, transport = a.transport, state_manager = state,
                                    device_id = "laptop" })
    for _ = 1, 2 do
      assert(engine:sync_now())
      assert(b.engine:sync_now())
    end
    assert.same(titles(a.storage), titles(b.storage))
    assert.equal("three, again", b.storage.stories.s3.title)
  end)

  it("survives a transport that raises or answers garbage", function()
    local a, b = scene()
    local t = a.transport
    t.fetch_operations = function() error("socket library crashed") end
    fails_cleanly(a, "transport fetch_operations raised an error: .*socket library crashed")
    t.fetch_operations = function() return 42 end
    fails_cleanly(a, "transport fetch_operations returned a number, not a result table")
    t.fetch_operations = function() return { operations = "none", version = 1 } end
    fails_cleanly(a, "operations is not a list")
    t.fetch_operations = function() return { operations = { { id = 1 } }, version = 1 } end
    fails_cleanly(a, "invalid operation from server")
    t.fetch_operations = nil
    t.push_operations = function() return "ok" end
    fails_cleanly(a, "transport push_operations returned a string, not a result table")
    assert.is_true(a.state:get_pending_count() >= 3)
    t.push_operations = function() return {} end
    fails_cleanly(a, "server rejected the push")
    t.push_operations = nil
    t._request = function() return { status = 200, body = "<html>", headers = {} } end
    fails_cleanly(a, "invalid JSON from server")
    t._request = nil
    recovers(a, b)
  end)

  it("survives the server going away and coming back (HTTP)", function()
    local a, b = scene()
    server:kill()
    fails_cleanly(a, "connection refused to http://")
    server:restart()
    recovers(a, b)
  end)

  it("survives the server going away and coming back (WebSocket)", function()
    local a, b = scene("websocket")
    server:kill()
    local err = fails_cleanly(a, ".")
    assert.is_truthy(err:lower():find("connect", 1, true) or err:lower():find("closed", 1, true), err)
    server:restart()
    local deadline = os.time() + 10
    local ok = a.engine:sync_now()
    while not ok and os.time() < deadline do
      a.transport:step(0.2)
      ok = a.engine:sync_now()
    end
    assert.is_true(ok)
    recovers(a, b)
  end)

  it("never shows a wrong key in its errors", function()
    local a = device("laptop")
    local wrong = "wrong-key-0123456789"
    a.transport = HTTPTransport.new({ base_url = server.url, api_key = wrong, timeout = 2, max_retries = 0 })
    a.engine._transport = a.transport
    a.storage:save_story("s1", { title = "one" })
    local ok, err = a.engine:sync_now()
    assert.is_false(ok)
    assert.equal("server returned HTTP 401: invalid API key", err)
    assert.is_false(mentions(err, wrong))
    assert.is_false(mentions(a.storage.backend_data, wrong))
    assert.equal(1, a.state:get_pending_count())
  end)
end)
