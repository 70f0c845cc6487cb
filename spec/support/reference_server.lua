--- Starts the reference sync server (target/debug/whisker-sync-server) on a
-- free loopback port with a temporary SQLite database, for specs that need a
-- real server. `make test` and `cargo test` build it first.
-- @module support.reference_server

local M = {}

M.api_key = "spec-key-0123456789"

local function root()
  local source = debug.getinfo(1, "S").source
  return source:match("^@(.*)/spec/support/[^/]+$") or "."
end

--- Path of the server binary, or nil and the reason it cannot be used.
function M.binary()
  local path = os.getenv("WHISKER_SYNC_SERVER") or (root() .. "/target/debug/whisker-sync-server")
  local probe = io.open(path, "rb")
  if not probe then
    return nil, "reference server not built (cargo build -p sync-server): " .. path
  end
  probe:close()
  return path
end

--- Starts a server; returns a handle with `url`, `ws_url`, `api_key`,
-- `stop()` and `restart()`, or nil and the reason.
function M.start()
  local binary, err = M.binary()
  if not binary then
    return nil, err
  end
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute(("mkdir -p %q"):format(dir)))
  local server = { dir = dir, db = dir .. "/sync.db", api_key = M.api_key }
  assert(os.execute(("%q keys add --key %q --db %q >/dev/null"):format(binary, M.api_key, server.db)))

  function server.launch(self, listen)
    self.pipe = io.popen(("sh -c 'echo $$; exec %q serve --db %q --listen %s 2>%q'"):format(
      binary, self.db, listen or "127.0.0.1:0", self.dir .. "/server.log"))
    self.pid = self.pipe:read("*l")
    local banner = self.pipe:read("*l") or ""
    self.address = assert(banner:match("https?://(%S+)"), "server did not start: " .. banner)
    self.url = "http://" .. self.address
    self.ws_url = "ws://" .. self.address .. "/ws"
  end

  --- Stops the server process (keeps the database).
  function server.kill(self)
    if self.pid then
      os.execute("kill " .. self.pid .. " 2>/dev/null")
      self.pipe:close()
      self.pid = nil
    end
  end

  --- Restarts on the same address with the same database.
  function server.restart(self)
    self:kill()
    self:launch(self.address)
  end

  --- Stops the server and removes its files.
  function server.stop(self)
    self:kill()
    os.execute(("rm -rf %q"):format(self.dir))
  end

  server:launch()
  return server
end

--- A server for every test of the enclosing `describe` block: started before
-- each test and stopped (files removed) after it. Returns one table that
-- holds the running test's server all along, so the block's helpers can
-- keep it as an upvalue. Call it inside `describe`; its hooks run in the
-- order of registration with the block's own.
function M.each_test()
  -- The spec's busted globals are not this module's; take them from busted.
  local busted = require("busted")
  local current = {}
  busted.before_each(function()
    for key, value in pairs(assert(M.start())) do
      current[key] = value
    end
  end)
  busted.after_each(function()
    -- Nothing to stop when the start failed.
    if current.stop then
      current:stop()
    end
    for key in pairs(current) do
      current[key] = nil
    end
  end)
  return current
end

return M
