--- `whisker sync` with assets, two device folders and the real reference
-- server: `assets add` copies a file and prints its reference, `now` uploads
-- referenced local assets before pushing and downloads missing ones after
-- pulling (also over the WebSocket transport, assets going by HTTP), a new
-- version replaces the old one on the other device, and a local change
-- that was never uploaded is kept and reported.

local SyncCommand = require("whisker.cli.commands.sync")
local native = require("whisker.storage.sync.native")
local reference_server = require("support.reference_server")
local files = require("support.files")
local buffer = require("support.output").buffer
local noise = require("support.bytes").noise
local tempdir, read, write = files.tempdir, files.read, files.write

describe("whisker sync with assets", function()
  local server = reference_server.each_test()
  local root

  before_each(function()
    root = tempdir()
  end)

  after_each(function()
    files.remove_tree(root)
  end)

  --- A device folder with its own command instance and captured output.
  local function device(name, transport)
    local dir = root .. "/" .. name
    assert(os.execute(("mkdir -p %q"):format(dir)))
    local d = { dir = dir, out = buffer(), err = buffer() }
    function d.run(...)
      local cmd = SyncCommand.new()
      cmd._config_path = dir .. "/.whisker-sync-config.json"
      cmd._storage_path = dir .. "/.whisker-storage"
      cmd._stdout, cmd._stderr = d.out, d.err
      d.out.clear()
      d.err.clear()
      return cmd:execute({ ... }), cmd
    end
    function d.storage()
      local _, cmd = d.run("help")
      return assert(cmd:create_storage())
    end
    function d.asset(file)
      return read(dir .. "/.whisker-storage/assets/" .. file)
    end
    assert.equals(0, (d.run("config", "--url", server.url, "--key", server.api_key,
      "--transport", transport or "http", "--device-name", name)))
    return d
  end

  it("moves referenced assets with the stories, new versions included", function()
    local laptop = device("laptop")
    local desktop = device("desktop", "websocket")
    local picture = noise(256 * 1024, 5)
    write(root .. "/cave.png", picture)

    assert.equals(0, (laptop.run("assets", "add", root .. "/cave.png", "--json")))
    local ref = native.json.decode(laptop.out.text(), "no output")
    assert.equals("sha256:" .. native.blob.sha256(picture), ref.asset)
    assert.equals("cave.png", ref.name)
    assert.equals(#picture, ref.size)
    assert.equals("image/png", ref.type)
    assert.equals(picture, laptop.asset("cave.png"))

    laptop.storage():save_story("cave", { title = "The Cave",
      passages = { { name = "start", text = "Dark.", image = ref } } })
    assert.equals(0, (laptop.run("assets")))
    assert.matches("here %(uploaded at the next sync%)", laptop.out.text())
    assert.equals(0, (laptop.run("now")), laptop.err.text())
    assert.matches("assets: 1 uploaded %(256%.0 KB%)", laptop.out.text())

    assert.equals(0, (desktop.run("now")), desktop.err.text())
    assert.matches("assets: 1 downloaded %(256%.0 KB%)", desktop.out.text())
    assert.equals(picture, desktop.asset("cave.png"))
    assert.equals(0, (desktop.run("assets")))
    assert.matches("here and on the server", desktop.out.text())

    -- Nothing moves when nothing changed.
    assert.equals(0, (laptop.run("now")))
    assert.is_nil(laptop.out.text():find("assets:", 1, true))

    -- A new version of the picture replaces the old one on the other device.
    local brighter = noise(200 * 1024, 6)
    write(laptop.dir .. "/.whisker-storage/assets/cave.png", brighter)
    assert.equals(0, (laptop.run("assets", "add", laptop.dir .. "/.whisker-storage/assets/cave.png", "--json")))
    local new_ref = native.json.decode(laptop.out.text(), "no output")
    local storage = laptop.storage()
    local story = storage:load_story("cave")
    story.passages[1].image = new_ref
    storage:save_story("cave", story)
    assert.equals(0, (laptop.run("now")), laptop.err.text())
    assert.matches("assets: 1 uploaded", laptop.out.text())
    assert.equals(0, (desktop.run("now")), desktop.err.text())
    assert.matches("assets: 1 downloaded", desktop.out.text())
    assert.equals(brighter, desktop.asset("cave.png"))

    -- A local edit that was never uploaded is kept and reported.
    write(desktop.dir .. "/.whisker-storage/assets/cave.png", "scribbled over")
    assert.equals(1, (desktop.run("now")))
    assert.matches("✓ Sync complete", desktop.out.text())
    assert.matches("✗ asset .*cave%.png differs from the sha256:", desktop.err.text())
    assert.equals("scribbled over", desktop.asset("cave.png"))
  end)

  it("leaves stories without assets alone and reports bad adds", function()
    local laptop = device("laptop")
    laptop.storage():save_story("plain", { title = "Plain", passages = { { name = "start", text = "Hi" } } })
    assert.equals(0, (laptop.run("now")))
    assert.is_nil(laptop.out.text():find("assets", 1, true))
    assert.equals(0, (laptop.run("assets")))
    assert.matches("No assets referenced by stories", laptop.out.text())
    assert.equals(1, (laptop.run("assets", "add", root .. "/missing.png")))
    assert.matches("cannot read", laptop.err.text())
    write(root .. "/x.png", "x")
    assert.equals(1, (laptop.run("assets", "add", root .. "/x.png", "../escape.png")))
    assert.matches("unsafe asset name", laptop.err.text())
    assert.equals(1, (laptop.run("assets", "remove")))
    assert.matches("unknown assets action", laptop.err.text())
  end)
end)
