-- whisker.sync.file_store: the story store `whisker sync` uses when
-- whisker-core's StorageService is not installed.

local FileStore = require("whisker.sync.file_store")
local json = require("whisker.storage.sync.native").json
local files = require("support.files")
local tempdir, read, write = files.tempdir, files.read, files.write

local function listing(dir)
  local pipe = io.popen("ls -A '" .. dir .. "'")
  local names = {}
  for name in pipe:lines() do
    names[#names + 1] = name
  end
  pipe:close()
  table.sort(names)
  return table.concat(names, " ")
end

describe("whisker.sync.file_store", function()
  local dir, root, store

  before_each(function()
    dir = tempdir()
    root = dir .. "/.whisker-storage"
    store = FileStore.new({ path = root })
    assert.is_true(store:initialize())
  end)

  after_each(function()
    files.remove_tree(dir)
  end)

  it("creates whisker-core's filesystem layout", function()
    assert.equals(".index.json metadata stories", listing(root))
    assert.same({}, json.decode(read(root .. "/.index.json"), ""))
  end)

  it("saves and loads stories with metadata in the same files as whisker-core", function()
    assert.is_true(store:save_story("tale", { title = "A Tale", passages = { { name = "Start" } } },
      { metadata = { tags = { "draft" } } }))
    local story = json.decode(read(root .. "/stories/tale.json"), "")
    assert.equals("A Tale", story.title)
    local meta = json.decode(read(root .. "/metadata/tale.meta.json"), "")
    assert.equals("tale", meta.id)
    assert.equals("A Tale", meta.title)
    assert.same({ "draft" }, meta.tags)
    assert.is_number(meta.updated_at)
    local index = json.decode(read(root .. "/.index.json"), "")
    assert.equals("A Tale", index.tale.title)
    assert.same(story, store:load_story("tale"))
  end)

  it("opens a folder another store wrote and sees later changes", function()
    store:save_story("one", { title = "One" })
    local other = FileStore.new({ path = root })
    assert.is_true(other:initialize())
    assert.equals("One", other:load_story("one").title)
    other:save_story("two", { title = "Two" })
    local ids = {}
    for _, entry in ipairs(store:list_stories()) do
      ids[#ids + 1] = entry.id
    end
    table.sort(ids)
    assert.same({ "one", "two" }, ids)
  end)

  it("reads an index written by whisker-core (numbers as floats, sync state indexed)", function()
    write(root .. "/.index.json", '{"old":{"id":"old","title":"Old","tags":{},"size":15.0,'
      .. '"created_at":1700000000.0,"updated_at":1700000001.0},'
      .. '"_whisker_sync_state":{"id":"_whisker_sync_state","title":"Untitled","tags":{},'
      .. '"size":10.0,"created_at":1700000000.0,"updated_at":1700000000.0}}')
    write(root .. "/stories/old.json", '{"title":"Old"}')
    local reopened = FileStore.new({ path = root })
    assert.is_true(reopened:initialize())
    local list = reopened:list_stories()
    assert.equals(1, #list)
    assert.equals("old", list[1].id)
    assert.equals(1700000001, list[1].updated_at)
    assert.equals("Old", reopened:load_story("old").title)
  end)

  it("keeps sync records out of the index and the story list", function()
    assert.is_true(store.backend:save("_whisker_sync_state", { device_id = "d" }, {}))
    assert.equals("d", store.backend:load("_whisker_sync_state").device_id)
    assert.is_true(store.backend:exists("_whisker_sync_state"))
    assert.is_not_nil(read(root .. "/stories/_whisker_sync_state.json"))
    assert.is_nil(json.decode(read(root .. "/.index.json"), "")._whisker_sync_state)
    assert.equals(0, #store:list_stories())
    assert.is_nil(store:load_story("_whisker_sync_state"))
    assert.is_false(store:has_story("_whisker_sync_state"))
    assert.is_true(store.backend:delete("_whisker_sync_state"))
    assert.is_false(store.backend:exists("_whisker_sync_state"))
  end)

  it("refuses a story under a sync record's name", function()
    local ok, err = store:save_story("_whisker_sync_state", { title = "x" })
    assert.is_false(ok)
    assert.matches("reserved", err)
  end)

  it("rejects ids that could escape the folder", function()
    for _, id in ipairs({ "../escape", "a/b", "..", "a\\b", "bad\nid", "", ("x"):rep(300) }) do
      local ok, err = store:save_story(id, { title = "x" })
      assert.is_false(ok, id)
      assert.is_string(err)
      local data = store:load_story(id)
      assert.is_nil(data)
      assert.is_false((store.backend:save(id, { title = "x" }, {})))
    end
    assert.is_nil(read(dir .. "/escape.json"))
    assert.equals(".index.json metadata stories", listing(root))
  end)

  it("writes through temporary files and leaves none behind", function()
    for i = 1, 5 do
      assert.is_true(store:save_story("s" .. i, { title = "v" .. i }))
    end
    assert.is_true(store:delete_story("s2"))
    assert.is_true(store:update_metadata("s3", { title = "Renamed", tags = { "t" } }))
    assert.is_nil(listing(root .. "/stories"):find("tmp", 1, true))
    assert.is_nil(listing(root .. "/metadata"):find("tmp", 1, true))
    assert.is_nil(listing(root):find("tmp", 1, true))
  end)

  it("replaces a story file atomically", function()
    store:save_story("s", { title = "old" })
    store:save_story("s", { title = "new", extra = ("x"):rep(10000) })
    assert.equals("new", store:load_story("s").title)
    assert.equals("new", json.decode(read(root .. "/stories/s.json"), "").title)
  end)

  it("deletes a story with its files and index entry", function()
    store:save_story("gone", { title = "Gone" })
    assert.is_true(store:delete_story("gone"))
    assert.is_nil(read(root .. "/stories/gone.json"))
    assert.is_nil(read(root .. "/metadata/gone.meta.json"))
    assert.is_nil(store:load_story("gone"))
    local ok, err = store:delete_story("gone")
    assert.is_false(ok)
    assert.equals("Story not found", err)
  end)

  it("emits StorageService events", function()
    local seen = {}
    for _, event in ipairs({ "story_saved", "story_created", "story_updated", "story_deleted",
      "metadata_updated", "storage_cleared" }) do
      store:on(event, function(data)
        seen[#seen + 1] = event .. ":" .. tostring(data.id)
      end)
    end
    store:save_story("e", { title = "E" })
    store:save_story("e", { title = "E2" })
    store:update_metadata("e", { title = "E3" })
    store:delete_story("e")
    store:clear()
    assert.same({ "story_saved:e", "story_created:e", "story_saved:e", "story_updated:e",
      "metadata_updated:e", "story_deleted:e", "storage_cleared:nil" }, seen)
  end)

  it("lists newest first with tag, limit and offset filters", function()
    store:save_story("a", { title = "A" }, { metadata = { tags = { "x" } } })
    store:save_story("b", { title = "B" }, { metadata = { tags = { "y" } } })
    store.index.a.updated_at = 10
    store.index.b.updated_at = 20
    assert.equals("b", store:list_stories()[1].id)
    assert.equals(1, #store:list_stories({ tags = { "x" } }))
    assert.equals("a", store:list_stories({ tags = { "x" } })[1].id)
    assert.equals("a", store:list_stories({ offset = 1, limit = 1 })[1].id)
  end)

  it("works as the sync engine's storage and state store", function()
    local SyncEngine = require("whisker.storage.sync.engine")
    local StateManager = require("whisker.storage.sync.state_manager")
    store:save_story("mine", { title = "Mine" })
    local pushed = {}
    local transport = {
      fetch_operations = function()
        return { operations = { { id = "op-r", type = "create", story_id = "theirs", data = { title = "Theirs" },
          timestamp = os.time(), device_id = "other", version = 1 } }, version = 1 }
      end,
      push_operations = function(_, _, ops)
        for _, op in ipairs(ops) do
          pushed[#pushed + 1] = op.story_id
        end
        return { success = true, conflicts = {}, version = 2 }
      end,
    }
    local state = StateManager.new(store)
    local engine = SyncEngine.new({ storage = store, transport = transport, state_manager = state })
    assert.is_true(engine:sync_now())
    assert.same({ "mine" }, pushed)
    assert.equals("Theirs", store:load_story("theirs").title)
    local ids = {}
    for _, entry in ipairs(store:list_stories()) do
      ids[#ids + 1] = entry.id
    end
    table.sort(ids)
    assert.same({ "mine", "theirs" }, ids)
    assert.equals(state:get_device_id(), StateManager.new(store):get_device_id())
  end)
end)
