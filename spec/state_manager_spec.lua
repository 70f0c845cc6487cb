--- Behaviour of the native state manager beyond the old API: durability,
-- constant-cost queueing, adoption of old state, recovery from corrupt state.

local json = require("whisker.storage.sync.native").json

local STATE_KEY = "_whisker_sync_state"

--- A storage whose backend records every call and the JSON size of every save.
local function recording_storage(with_delete)
  local storage = { data = {}, calls = {}, saves = {} }
  storage.backend = {
    load = function(_, key)
      table.insert(storage.calls, "load")
      return storage.data[key]
    end,
    save = function(_, key, data, metadata)
      table.insert(storage.calls, "save")
      assert(type(data) == "table", "saved data must be a table")
      assert(type(metadata) == "table")
      storage.data[key] = data
      local encoded = json.encode(data)
      table.insert(storage.saves, { key = key, bytes = #encoded })
      return true
    end,
  }
  if with_delete then
    storage.backend.delete = function(_, key)
      table.insert(storage.calls, "delete")
      storage.data[key] = nil
      return true
    end
  end
  return storage
end

local function saves_of(storage, key)
  local n = 0
  for _, save in ipairs(storage.saves) do
    if save.key == key then
      n = n + 1
    end
  end
  return n
end

describe("native state manager", function()
  local SyncStateManager

  before_each(function()
    package.loaded["whisker.storage.sync.state_manager"] = nil
    SyncStateManager = require("whisker.storage.sync.state_manager")
  end)

  it("saves a UUID v4 device id before the constructor returns", function()
    local storage = recording_storage()
    local mgr = SyncStateManager.new(storage)
    local saved = storage.data[STATE_KEY]
    assert.is_table(saved)
    assert.equals(mgr:get_device_id(), saved.device_id)
    assert.matches("^%x+%-%x+%-4%x+%-[89ab]%x+%-%x+$", saved.device_id)
    assert.not_equals(saved.device_id, SyncStateManager.new(recording_storage()):get_device_id())
  end)

  it("stores the state as a table with the old fields", function()
    local storage = recording_storage()
    SyncStateManager.new(storage):record_sync(10, 1, 0)
    local saved = storage.data[STATE_KEY]
    for _, field in ipairs({ "device_id", "last_sync_time", "version_vector", "pending_operations",
      "sync_status", "stats" }) do
      assert.is_not_nil(saved[field], field)
    end
    assert.equals(1, saved.stats.total_syncs)
  end)

  it("queues one more operation with one small write, however long the queue", function()
    local storage = recording_storage()
    local mgr = SyncStateManager.new(storage)
    local main_saves = saves_of(storage, STATE_KEY)
    local first, last
    for i = 1, 300 do
      local before = #storage.saves
      assert.is_true(mgr:queue_operation({ type = "update", story_id = "story", timestamp = i, data = { n = 1 } }))
      assert.equals(before + 1, #storage.saves)
      local bytes = storage.saves[#storage.saves].bytes
      if i == 1 then first = bytes end
      last = bytes
    end
    assert.is_true(last <= first + 8, ("first %d bytes, last %d bytes"):format(first, last))
    assert.equals(main_saves, saves_of(storage, STATE_KEY))
    assert.equals(300, SyncStateManager.new(storage):get_pending_count())
  end)

  it("keeps queue changes durable across instances", function()
    local storage = recording_storage()
    local mgr = SyncStateManager.new(storage)
    mgr:queue_operations_batch({
      { type = "create", story_id = "a", timestamp = 1 },
      { type = "update", story_id = "b", timestamp = 2 },
    })
    mgr:queue_operation({ type = "delete", story_id = "c", timestamp = 3 })
    mgr:queue_operation({ type = "update", story_id = "d", timestamp = 4 })
    assert.is_true(mgr:remove_pending_operation(2))
    assert.is_true(mgr:remove_pending_operation_by_match({ type = "create", story_id = "a", timestamp = 1 }))
    assert.is_false(mgr:remove_pending_operation(9))
    local again = SyncStateManager.new(storage)
    local pending = again:get_pending_operations()
    assert.equals(2, #pending)
    assert.equals("c", pending[1].story_id)
    assert.equals("d", pending[2].story_id)
    again:clear_pending_operations()
    assert.equals(0, SyncStateManager.new(storage):get_pending_count())
    again:queue_operation({ type = "create", story_id = "e", timestamp = 5 })
    assert.equals("e", SyncStateManager.new(storage):get_pending_operations()[1].story_id)
  end)

  it("calls only load and save on a backend without delete", function()
    local storage = recording_storage(false)
    local mgr = SyncStateManager.new(storage)
    mgr:queue_operation({ type = "create", story_id = "a", timestamp = 1 })
    mgr:clear_pending_operations()
    mgr:reset()
    for _, call in ipairs(storage.calls) do
      assert.is_true(call == "load" or call == "save", call)
    end
  end)

  it("deletes dead queue records when the backend can", function()
    local storage = recording_storage(true)
    local mgr = SyncStateManager.new(storage)
    mgr:queue_operation({ type = "create", story_id = "a", timestamp = 1 })
    mgr:queue_operation({ type = "create", story_id = "b", timestamp = 2 })
    mgr:clear_pending_operations()
    local keys = 0
    for key in pairs(storage.data) do
      keys = keys + 1
      assert.equals(STATE_KEY, key)
    end
    assert.equals(1, keys)
  end)

  it("adopts an old state's pending operations and moves them out of the main record", function()
    local storage = recording_storage()
    storage.data[STATE_KEY] = {
      device_id = "old-device",
      last_sync_time = 5,
      version_vector = {},
      pending_operations = { { type = "CREATE", story_id = "s1", timestamp = 1 } },
      sync_status = "idle",
      stats = { total_syncs = 3 },
    }
    local mgr = SyncStateManager.new(storage)
    assert.equals("old-device", mgr:get_device_id())
    assert.equals(1, mgr:get_pending_count())
    assert.equals(0, #storage.data[STATE_KEY].pending_operations)
    assert.equals(3, mgr:get_stats().total_syncs)
    assert.equals(0, mgr:get_stats().bandwidth_sent_bytes)
    assert.equals("s1", SyncStateManager.new(storage):get_pending_operations()[1].story_id)
  end)

  it("replaces a corrupt state with defaults, says so, and leaves stories alone", function()
    local storage = recording_storage()
    storage.data[STATE_KEY] = "not a table"
    storage.data["story-1"] = { title = "Mine" }
    local mgr = SyncStateManager.new(storage)
    local err = mgr:get_last_error()
    assert.is_table(err)
    assert.matches("not a sync state", err.message)
    assert.is_string(mgr:get_device_id())
    assert.equals("Mine", storage.data["story-1"].title)
    assert.equals(mgr:get_device_id(), SyncStateManager.new(storage):get_device_id())
  end)

  it("repairs malformed fields of an adopted state", function()
    local storage = recording_storage()
    storage.data[STATE_KEY] = { device_id = "d-1", stats = "zero", version_vector = 7 }
    local mgr = SyncStateManager.new(storage)
    assert.equals("d-1", mgr:get_device_id())
    assert.equals(0, mgr:get_stats().total_syncs)
    assert.matches("stats was a string", mgr:get_last_error().message)
  end)

  it("keeps statistics as integers", function()
    local mgr = SyncStateManager.new(recording_storage())
    mgr:record_sync(12.6, 3, 1)
    mgr:record_bandwidth(100.2, nil)
    local stats = mgr:get_stats()
    assert.equals(13, stats.last_sync_duration_ms)
    assert.equals(100, stats.bandwidth_sent_bytes)
    if math.type then
      assert.equals("integer", math.type(stats.last_sync_duration_ms))
      assert.equals("integer", math.type(stats.total_syncs))
    end
  end)

  it("reports a refused write as false and the backend's message", function()
    local storage = recording_storage()
    local mgr = SyncStateManager.new(storage)
    storage.backend.save = function()
      return false, "disk full"
    end
    local ok, err = mgr:record_error("boom")
    assert.is_false(ok)
    assert.matches("disk full", err)
  end)

  it("round-trips the whole state through load_state and save_state", function()
    local storage = recording_storage()
    local mgr = SyncStateManager.new(storage)
    mgr:queue_operation({ type = "create", story_id = "a", timestamp = 1 })
    local state = mgr:load_state()
    state.version_vector["dev"] = 4
    table.insert(state.pending_operations, { type = "update", story_id = "b", timestamp = 2 })
    assert.is_true(mgr:save_state(state))
    local again = SyncStateManager.new(storage)
    assert.equals(4, again:get_device_version("dev"))
    assert.equals(2, again:get_pending_count())
  end)

  it("requires a storage with a backend", function()
    assert.has_error(function() SyncStateManager.new(nil) end, "storage_service is required")
    assert.has_error(function() SyncStateManager.new({}) end, "storage_service.backend is required")
  end)
end)
