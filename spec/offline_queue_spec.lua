--- Weeks offline, against the real reference server: every day's edits to
-- many stories are queued (durably) by a sync that cannot reach the server;
-- back online, one `sync_now` sends them all, one operation per story (the
-- queue is compacted to each story's latest change before pushing), and a
-- second device ends up with exactly the last edit of every story.

local SyncEngine = require("whisker.storage.sync.engine")
local HTTPTransport = require("whisker.storage.sync.transports.http")
local StateManager = require("whisker.storage.sync.state_manager")
local reference_server = require("support.reference_server")
local story_service = require("support.story_service").new

local function story(id, day)
  return { title = id .. " (day " .. day .. ")",
           passages = { { name = "start", text = ("Written on day %d of the trip."):format(day) } } }
end

describe("a device offline for weeks", function()
  local server = reference_server.each_test()

  local function device(name)
    local storage = story_service()
    local transport = HTTPTransport.new({ base_url = server.url, api_key = server.api_key, timeout = 5,
                                          max_retries = 0 })
    local state = StateManager.new(storage)
    local engine = SyncEngine.new({ storage = storage, transport = transport, state_manager = state,
                                    device_id = name })
    return { storage = storage, transport = transport, state = state, engine = engine }
  end

  it("sends every story's last edit in one sync, one operation per story", function()
    local stories, days, created = 150, 21, 20
    local laptop = device("laptop")
    for i = 1, stories do
      laptop.storage.stories["story-" .. i] = story("story-" .. i, 0)
    end
    assert.is_true(laptop.engine:sync_now())
    local online_version = assert(laptop.transport:get_server_version("laptop")).version
    assert.equals(stories, online_version)

    -- Three weeks without the server: every story edited daily, some deleted, new ones written.
    laptop.transport.base_url = "http://127.0.0.1:9"
    for day = 1, days do
      for i = 1, stories do
        local id = "story-" .. i
        if laptop.storage.stories[id] then
          laptop.storage.stories[id] = story(id, day)
        end
      end
      if day == 5 then
        for i = 1, 10 do
          laptop.storage.stories["story-" .. i] = nil
        end
      end
      if day >= 7 and day < 7 + created then
        laptop.storage.stories["new-" .. day] = story("new-" .. day, day)
      end
      local ok, err = laptop.engine:sync_now()
      assert.is_false(ok)
      assert.matches("connection refused", err)
    end
    -- Every offline day queued its edits (thousands of operations, kept durably).
    assert.is_true(laptop.state:get_pending_count() > 10 * stories)

    -- Back online: one sync sends it all.
    laptop.transport.base_url = server.url
    local completed
    laptop.engine:on("sync_completed", function(event)
      completed = event
    end)
    local ok, err = laptop.engine:sync_now()
    assert.is_true(ok, err)
    local changed = stories + (days - 7 + 1)
    assert.equals(changed, completed.operations_pushed)
    assert.equals(0, laptop.state:get_pending_count())
    -- The server stored exactly one new operation per story changed offline.
    local version = assert(laptop.transport:get_server_version("laptop")).version
    assert.equals(online_version + changed, version)

    -- Another device sees the last day's edits and none of the deleted stories.
    local desktop = device("desktop")
    assert.is_true(desktop.engine:sync_now())
    local count = 0
    for id, data in pairs(desktop.storage.stories) do
      count = count + 1
      assert.same(laptop.storage.stories[id], data)
    end
    assert.equals(stories - 10 + (days - 7 + 1), count)
    assert.is_nil(desktop.storage.stories["story-1"])
    assert.equals("story-11 (day 21)", desktop.storage.stories["story-11"].title)
  end)
end)
