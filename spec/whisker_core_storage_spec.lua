--- Two devices on whisker-core's real StorageService (filesystem backend),
-- syncing through our engine and the reference server. Runs when
-- whisker-core's lib/ is on the path (WHISKER_CORE in `make test`).

local reference_server = require("support.reference_server")

local has_storage, Storage = pcall(require, "whisker.storage")

describe("whisker-core's StorageService through the engine", function()
  if not has_storage then
    pending("whisker-core is not on the path (set WHISKER_CORE)")
    return
  end

  local SyncEngine = require("whisker.storage.sync.engine")
  local HTTPTransport = require("whisker.storage.sync.transports.http")
  local StateManager = require("whisker.storage.sync.state_manager")
  local server = reference_server.each_test()
  local dirs

  local function device(name)
    local dir = os.tmpname()
    os.remove(dir)
    dirs[#dirs + 1] = dir
    local storage = Storage.new({ backend = "filesystem", path = dir })
    assert(storage:initialize())
    local state = StateManager.new(storage)
    local engine = SyncEngine.new({
      storage = storage,
      state_manager = state,
      device_id = name,
      transport = HTTPTransport.new({ base_url = server.url, api_key = server.api_key, timeout = 5 }),
    })
    return { storage = storage, engine = engine, state = state, dir = dir }
  end

  --- Story id → title, as `list_stories` and `load_story` give them.
  local function titles(d)
    local out = {}
    for _, meta in ipairs(d.storage:list_stories()) do
      if meta.id:sub(1, 1) ~= "_" then
        out[meta.id] = d.storage:load_story(meta.id).title
      end
    end
    return out
  end

  before_each(function()
    dirs = {}
  end)

  after_each(function()
    for _, dir in ipairs(dirs) do
      os.execute(("rm -rf %q"):format(dir))
    end
  end)

  it("carries creates, edits, deletes and conflicts between the devices", function()
    local laptop, desktop = device("laptop"), device("desktop")
    assert(laptop.storage:save_story("cave", { title = "The Cave", passages = { { name = "Start" } } }))
    assert(laptop.storage:save_story("tower", { title = "The Tower" }))
    assert(laptop.engine:sync_now())
    assert(desktop.engine:sync_now())
    assert.same({ cave = "The Cave", tower = "The Tower" }, titles(desktop))

    assert(desktop.storage:save_story("cave", { title = "The Deep Cave", passages = { { name = "Start" } } }))
    assert(laptop.storage:delete_story("tower"))
    assert(desktop.engine:sync_now())
    assert(laptop.engine:sync_now())
    assert(desktop.engine:sync_now())
    assert.same({ cave = "The Deep Cave" }, titles(laptop))
    assert.same({ cave = "The Deep Cave" }, titles(desktop))

    assert(laptop.storage:save_story("cave", { title = "Laptop's cave" }))
    assert(desktop.storage:save_story("cave", { title = "Desktop's cave" }))
    assert(laptop.engine:sync_now())
    assert(desktop.engine:sync_now())
    assert(laptop.engine:sync_now())
    assert.same(titles(laptop), titles(desktop))
    assert.equal(1, desktop.state:get_stats().conflicts_resolved)
    assert.equal(0, laptop.state:get_pending_count() + desktop.state:get_pending_count())
  end)

  it("finds edits made while the engine was not running", function()
    local laptop, desktop = device("laptop"), device("desktop")
    assert(laptop.storage:save_story("s", { title = "Before" }))
    assert(laptop.engine:sync_now())
    assert(desktop.engine:sync_now())
    -- Another process edits the files; a new engine on the same folder sees it.
    local editor = Storage.new({ backend = "filesystem", path = laptop.dir })
    assert(editor:initialize())
    assert(editor:save_story("s", { title = "Edited offline" }))
    local restarted = SyncEngine.new({
      storage = laptop.storage,
      state_manager = StateManager.new(laptop.storage),
      device_id = "laptop",
      transport = HTTPTransport.new({ base_url = server.url, api_key = server.api_key, timeout = 5 }),
    })
    laptop.storage:cache_clear()
    assert(restarted:sync_now())
    assert(desktop.engine:sync_now())
    assert.same({ s = "Edited offline" }, titles(desktop))
  end)
end)
