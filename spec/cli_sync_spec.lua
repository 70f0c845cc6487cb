-- `whisker sync` (whisker.cli.commands.sync): what a user sees and what each
-- subcommand leaves behind. The transport is a scripted double here; the
-- end-to-end test (scripts/test-cli-e2e.sh) runs the real command against
-- the real server.

local FileStore = require("whisker.sync.file_store")
local json = require("whisker.storage.sync.native").json
local files = require("support.files")
local buffer = require("support.output").buffer
local tempdir, read, write = files.tempdir, files.read, files.write

local function mode_of(path)
  local pipe = io.popen("stat -c %a '" .. path .. "' 2>/dev/null || stat -f %Lp '" .. path .. "'")
  local mode = pipe:read("*l")
  pipe:close()
  return mode
end

--- A server double: remote operations to hand out, pushes recorded.
local function server_double(remote_ops)
  local server = { remote = remote_ops or {}, pushed = {}, version = #(remote_ops or {}), fetches = 0 }
  function server:fetch_operations(_, since)
    self.fetches = self.fetches + 1
    if self.fail then
      return nil, self.fail
    end
    if self.on_fetch then
      self.on_fetch(self)
    end
    local ops = {}
    for _, op in ipairs(self.remote) do
      if op.version > since then
        ops[#ops + 1] = op
      end
    end
    return { operations = ops, version = self.version, has_more = false }
  end
  function server:push_operations(_, operations)
    if self.fail then
      return nil, self.fail
    end
    for _, op in ipairs(operations) do
      self.version = self.version + 1
      self.pushed[#self.pushed + 1] = op
    end
    return { success = true, conflicts = {}, version = self.version }
  end
  return server
end

local function remote_op(story_id, title, version, op_type)
  return {
    id = "remote-op-" .. story_id .. "-" .. version,
    type = op_type or "create",
    story_id = story_id,
    data = title and { title = title } or nil,
    timestamp = os.time(),
    device_id = "device-elsewhere",
    version = version,
  }
end

describe("whisker sync", function()
  local SyncCommand, dir, cmd, out, err, server

  local function new_command()
    local c = SyncCommand.new()
    c._config_path = dir .. "/.whisker-sync-config.json"
    c._storage_path = dir .. "/.whisker-storage"
    c._stdout = out
    c._stderr = err
    c._tty = false
    c.create_transport = function()
      return server
    end
    return c
  end

  local function run(...)
    out, err = buffer(), buffer()
    cmd = new_command()
    return cmd:execute({ ... })
  end

  local function store()
    local s = FileStore.new({ path = dir .. "/.whisker-storage" })
    assert(s:initialize())
    return s
  end

  local function configure(...)
    assert.equals(0, run("config", "--url", "http://127.0.0.1:9", "--key", "k", ...))
  end

  before_each(function()
    package.loaded["whisker.cli.commands.sync"] = nil
    SyncCommand = require("whisker.cli.commands.sync")
    dir = tempdir()
    server = server_double()
    out, err = buffer(), buffer()
  end)

  after_each(function()
    files.remove_tree(dir)
  end)

  describe("arguments", function()
    it("reports a non-numeric --interval instead of silently using the default", function()
      assert.equals(1, run("config", "--url", "http://h", "--key", "k", "--interval", "abc"))
      assert.matches("^Error: %-%-interval must be a number of milliseconds", err:text())
      assert.is_nil(read(dir .. "/.whisker-sync-config.json"))
    end)

    it("stores --interval as an integer number of milliseconds", function()
      assert.equals(0, run("config", "--url", "http://h", "--key", "k", "--interval", "1e3"))
      assert.matches("Interval: 1000ms\n", out:text(), 1, true)
      assert.is_nil(out:text():find("1000.0", 1, true))
    end)

    it("rejects unknown options, misplaced options and stray arguments with one error line", function()
      assert.equals(1, run("status", "--verbose"))
      assert.equals("Error: unknown option '--verbose' (see 'whisker sync help')\n", err:text())
      assert.equals(1, run("now", "--json"))
      assert.matches("does not apply to 'whisker sync now'", err:text())
      assert.equals(1, run("stats", "extra"))
      assert.matches("unexpected argument 'extra'", err:text())
      assert.equals(1, run("config", "--url"))
      assert.matches("%-%-url needs a value", err:text())
    end)

    it("accepts --flag=value", function()
      local parsed = SyncCommand.new():parse_args({ "config", "--url=http://h", "--key=k" })
      assert.equals("http://h", parsed.url)
      assert.equals("k", parsed.key)
    end)

    it("prints the help and exits 0 for an unknown subcommand", function()
      assert.equals(0, run("frobnicate"))
      assert.matches("^Unknown subcommand: frobnicate\n", out:text())
      assert.matches("conflicts", out:text())
    end)
  end)

  describe("config", function()
    it("writes the configuration readable by its owner only", function()
      configure("--device-name", "Laptop", "--strategy", "manual", "--transport", "websocket")
      local path = dir .. "/.whisker-sync-config.json"
      assert.equals("600", mode_of(path))
      local config = json.decode(read(path), "")
      assert.same({ url = "http://127.0.0.1:9", api_key = "k", transport = "websocket", sync_interval = 60000,
        device_name = "Laptop", conflict_strategy = "manual" }, config)
      assert.matches("✓ Sync configured successfully", out:text(), 1, true)
    end)

    it("keeps settings that are not given again", function()
      configure("--device-name", "Laptop", "--strategy", "auto_merge")
      assert.equals(0, run("config", "--interval", "5000"))
      local config = json.decode(read(dir .. "/.whisker-sync-config.json"), "")
      assert.equals("http://127.0.0.1:9", config.url)
      assert.equals("k", config.api_key)
      assert.equals("Laptop", config.device_name)
      assert.equals("auto_merge", config.conflict_strategy)
      assert.equals(5000, config.sync_interval)
    end)

    it("requires a URL and a key the first time", function()
      assert.equals(1, run("config", "--key", "k"))
      assert.equals("Error: --url is required\n", err:text())
      assert.equals(1, run("config", "--url", "http://h"))
      assert.equals("Error: --key is required\n", err:text())
    end)

    it("keeps a selective-sync subset until --all clears it", function()
      configure("--only", "chapter-*, intro", "--tags", "published")
      local config = json.decode(read(dir .. "/.whisker-sync-config.json"), "")
      assert.same({ "chapter-*", "intro" }, config.only)
      assert.same({ "published" }, config.tags)
      assert.matches("Syncing: stories matching chapter-*, intro or stories tagged published", out:text(), 1, true)
      assert.equals(0, run("status"))
      assert.matches("Syncing: stories matching chapter-*, intro or stories tagged published", out:text(), 1, true)
      assert.equals(0, run("config", "--all"))
      config = json.decode(read(dir .. "/.whisker-sync-config.json"), "")
      assert.is_nil(config.only)
      assert.is_nil(config.tags)
      assert.matches("Syncing: all stories", out:text(), 1, true)
      assert.equals(1, run("config", "--only", ","))
      assert.matches("%-%-only needs at least one name", err:text())
    end)

    it("validates transport, strategy and URL when configuring", function()
      assert.equals(1, run("config", "--url", "http://h", "--key", "k", "--transport", "carrier-pigeon"))
      assert.matches("unknown transport 'carrier%-pigeon'", err:text())
      assert.equals(1, run("config", "--url", "http://h", "--key", "k", "--strategy", "coin_flip"))
      assert.matches("unknown conflict strategy 'coin_flip'", err:text())
      assert.equals(1, run("config", "--url", "ftp://h", "--key", "k"))
      assert.matches("must start with http://", err:text())
      assert.is_nil(read(dir .. "/.whisker-sync-config.json"))
    end)
  end)

  describe("transports", function()
    it("passes the HTTP timeout in seconds and derives the WebSocket URL", function()
      local c = SyncCommand.new()
      local http = assert(c:create_transport({ url = "http://127.0.0.1:9/", api_key = "k" }, "dev"))
      assert.equals(30, http.timeout)
      assert.equals("http://127.0.0.1:9", http.base_url)
      http = assert(c:create_transport({ url = "http://127.0.0.1:9", api_key = "k", timeout = 5000 }, "dev"))
      assert.equals(5, http.timeout)
      local ws = assert(c:create_transport({ url = "https://sync.example.com", api_key = "k",
        transport = "websocket" }, "dev"))
      assert.equals("wss://sync.example.com/ws", ws.ws_url)
      assert.equals("dev", ws.device_id)
      local _, unknown = c:create_transport({ url = "http://h", api_key = "k", transport = "smoke" }, "dev")
      assert.equals("Unknown transport type: smoke", unknown)
    end)

    it("connects a WebSocket transport before syncing and reports a refused login", function()
      configure("--transport", "websocket")
      local calls = {}
      server.connected = false
      function server.is_connected(self)
        return self.connected
      end
      function server.connect(self)
        calls[#calls + 1] = "connect"
        if self.refuse then
          return nil, "Authentication failed: invalid API key"
        end
        self.connected = true
        return true
      end
      function server.disconnect(self)
        calls[#calls + 1] = "disconnect"
        self.connected = false
      end
      assert.equals(0, run("now"))
      assert.same({ "connect", "disconnect" }, calls)
      server.refuse = true
      assert.equals(1, run("now"))
      assert.matches("Authentication failed: invalid API key", err:text(), 1, true)
      assert.equals(0, run("status"))
      assert.matches("✗ Last error: cannot connect to the sync server: Authentication failed", out:text(), 1, true)
    end)
  end)

  describe("now, status and stats", function()
    it("syncs, then status and stats show what happened", function()
      configure("--device-name", "Laptop")
      store():save_story("mine", { title = "Mine" })
      server.remote = { remote_op("theirs", "Theirs", 1) }
      server.version = 1
      assert.equals(0, run("now"))
      assert.matches("^Syncing%.%.%.\n✓ Sync complete %(%d+%.%d%ds%)\n  1 received, 1 sent\n$", out:text())
      assert.equals("mine", server.pushed[1].story_id)
      assert.equals("Theirs", store():load_story("theirs").title)

      assert.equals(0, run("status"))
      local status = out:text()
      assert.matches("Status: idle\n", status, 1, true)
      assert.matches("Last sync: %d+ seconds ago", status)
      assert.matches("Server: http://127.0.0.1:9 (http)\n", status, 1, true)
      assert.matches("Device: Laptop %(%x+%-", status)
      assert.matches("Pending: 0 operations\n", status, 1, true)
      assert.matches("Conflicts: none\n", status, 1, true)
      assert.matches("Auto-sync: not running\n", status, 1, true)

      assert.equals(0, run("stats"))
      local stats = out:text()
      assert.matches("Total syncs: 1\n", stats, 1, true)
      assert.matches("Conflicts resolved: 0\n", stats, 1, true)
      assert.matches("Bandwidth: ↓ %d+ B, ↑ %d+ B\n", stats)
      assert.is_nil(stats:find("%d%.0[^%d]"))
    end)

    it("gives status and stats as JSON for scripts", function()
      configure()
      assert.equals(0, run("now"))
      assert.equals(0, run("status", "--json"))
      local status = json.decode(out:text(), "")
      assert.equals("idle", status.status)
      assert.equals(0, status.pending_operations)
      assert.equals(0, status.unresolved_conflicts)
      assert.same({}, status.conflicts)
      assert.equals("http://127.0.0.1:9", status.server.url)
      assert.is_false(status.auto_sync.running)
      assert.is_true(status.last_sync_time > 0)
      assert.equals(0, run("stats", "--json"))
      local stats = json.decode(out:text(), "")
      assert.equals(1, stats.total_syncs)
    end)

    it("reports a failed sync on stderr with exit code 1, and status shows it", function()
      configure()
      store():save_story("mine", { title = "Mine" })
      server.fail = "connection refused to http://127.0.0.1:9/operations"
      assert.equals(1, run("now"))
      assert.equals("Syncing...\n", out:text())
      assert.matches("✗ Sync failed: .*connection refused", err:text())
      assert.equals(0, run("status"))
      assert.matches("Pending: 1 operations", out:text(), 1, true)
      assert.matches("Last sync: Never", out:text(), 1, true)
      assert.matches("✗ Last error: .*connection refused", out:text())
    end)

    it("draws a progress bar on a terminal", function()
      configure()
      out, err = buffer(), buffer()
      cmd = new_command()
      cmd._tty = true
      assert.equals(0, cmd:execute({ "now" }))
      assert.matches("\r[##############################] 100% complete", out:text(), 1, true)
      assert.matches("✓ Sync complete", out:text(), 1, true)
    end)

    it("shows status without a configuration and without contacting a server", function()
      assert.equals(0, run("status"))
      assert.matches("Last sync: Never", out:text(), 1, true)
      assert.matches("Server: not configured", out:text(), 1, true)
      assert.equals(0, server.fetches)
    end)

    it("needs a configuration to sync", function()
      assert.equals(1, run("now"))
      assert.matches("^Error: Configuration file not found", err:text())
    end)

    it("formats sizes and ages as integers whatever the number type", function()
      local c = SyncCommand.new()
      assert.equals("100 B", c:format_bytes(100.0))
      assert.equals("100 B", c:format_bytes(100.7))
      assert.equals("1.5 GB", c:format_bytes(1.5 * 1024 * 1024 * 1024))
      assert.equals("59 seconds ago", c:format_duration(59.9))
      assert.equals("1 days ago", c:format_duration(86400.0))
    end)
  end)

  describe("start and stop", function()
    it("runs until a stop is requested, one line per sync, and cleans up", function()
      configure("--interval", "100")
      store():save_story("mine", { title = "Mine" })
      local pid_path = dir .. "/.whisker-storage/.whisker-sync.pid"
      server.on_fetch = function(s)
        assert.is_not_nil(read(pid_path))
        if s.fetches == 3 then
          write(dir .. "/.whisker-storage/.whisker-sync.stop", "")
        end
      end
      out, err = buffer(), buffer()
      cmd = new_command()
      cmd._max_loops = 200
      cmd._poll_slice = 0.02
      assert.equals(0, cmd:execute({ "start" }))
      local text = out:text()
      assert.matches("^✓ Sync started\n", text)
      assert.matches("Checking for updates every 100ms\n", text, 1, true)
      assert.matches("%] synced: 0 received, 1 sent %(%d+ ms%)\n", text)
      assert.matches("%] up to date\n", text)
      assert.matches("✓ Sync stopped %(stop requested%)\n$", text)
      assert.equals(3, server.fetches)
      assert.is_nil(read(pid_path))
      assert.is_nil(read(dir .. "/.whisker-storage/.whisker-sync.stop"))
    end)

    it("stops cleanly when interrupted (Ctrl+C)", function()
      configure("--interval", "100")
      server.on_fetch = function(s)
        if s.fetches == 2 then
          error("interrupted!")
        end
      end
      out, err = buffer(), buffer()
      cmd = new_command()
      cmd._max_loops = 200
      cmd._poll_slice = 0.02
      assert.equals(0, cmd:execute({ "start" }))
      assert.matches("✓ Sync stopped %(interrupted%)\n$", out:text())
      assert.is_nil(read(dir .. "/.whisker-storage/.whisker-sync.pid"))
    end)

    it("keeps running when a sync fails, reporting the error", function()
      configure("--interval", "100")
      server.fail = "server returned HTTP 503"
      out, err = buffer(), buffer()
      cmd = new_command()
      cmd._max_loops = 3
      cmd._poll_slice = 0.02
      assert.equals(0, cmd:execute({ "start" }))
      assert.matches("✗ sync failed: server returned HTTP 503", err:text(), 1, true)
    end)

    it("says when no sync is running, and removes a stale pid file", function()
      assert.equals(0, run("stop"))
      assert.equals("No running sync found\n", out:text())
      os.execute("mkdir -p '" .. dir .. "/.whisker-storage'")
      write(dir .. "/.whisker-storage/.whisker-sync.pid", "2147483646\n")
      assert.equals(0, run("stop"))
      assert.equals("No running sync found (removed a stale pid file)\n", out:text())
      assert.is_nil(read(dir .. "/.whisker-storage/.whisker-sync.pid"))
    end)
  end)

  describe("reset", function()
    it("refuses without a terminal unless --yes", function()
      configure()
      assert.equals(0, run("now"))
      assert.equals(1, run("reset"))
      assert.matches("stdin is not a terminal; run 'whisker sync reset %-%-yes'", err:text())
      assert.equals(0, run("stats"))
      assert.matches("Total syncs: 1", out:text(), 1, true)
    end)

    it("asks for confirmation on a terminal", function()
      configure()
      assert.equals(0, run("now"))
      out, err = buffer(), buffer()
      cmd = new_command()
      cmd._tty = true
      cmd._read_line = function()
        return "no"
      end
      assert.equals(0, cmd:execute({ "reset" }))
      assert.matches("Type 'yes' to confirm: Cancelled\n$", out:text())
      cmd._read_line = function()
        return "yes"
      end
      assert.equals(0, cmd:execute({ "reset" }))
      assert.matches("✓ Sync state reset\n$", out:text())
    end)

    it("with --yes forgets what was synced but keeps the device id and the stories", function()
      configure()
      store():save_story("mine", { title = "Mine" })
      assert.equals(0, run("now"))
      assert.equals(0, run("status", "--json"))
      local device = json.decode(out:text(), "").device.id
      assert.equals(0, run("reset", "--yes"))
      assert.equals("✓ Sync state reset\n", out:text())
      assert.equals(0, run("status", "--json"))
      local status = json.decode(out:text(), "")
      assert.equals(device, status.device.id)
      assert.equals(0, status.last_sync_time)
      assert.equals("Mine", store():load_story("mine").title)
      server.pushed = {}
      assert.equals(0, run("now"))
      assert.equals("mine", server.pushed[1].story_id)
    end)
  end)

  describe("conflicts", function()
    local function make_conflict()
      configure("--strategy", "manual")
      store():save_story("tale", { title = "Local tale" })
      server.remote = { remote_op("tale", "Remote tale", 1, "update") }
      server.version = 1
      assert.equals(0, run("now"))
      assert.matches("conflict on 'tale': left for you", out:text(), 1, true)
      assert.matches("1 conflict(s) need your decision", out:text(), 1, true)
    end

    it("lists conflicts left for the user", function()
      make_conflict()
      assert.equals(0, run("conflicts"))
      local text = out:text()
      assert.matches("Unresolved conflicts: 1\n", text, 1, true)
      assert.matches('local:  "Local tale"', text, 1, true)
      assert.matches('remote: "Remote tale"', text, 1, true)
      assert.equals(0, run("conflicts", "--json"))
      local listed = json.decode(out:text(), "").conflicts
      assert.equals("tale", listed[1].story_id)
      assert.equals(0, run("status"))
      assert.matches("Conflicts: 1 unresolved", out:text(), 1, true)
    end)

    it("resolves one by the user's choice", function()
      make_conflict()
      assert.equals(0, run("conflicts", "resolve", "tale", "--use", "remote"))
      assert.matches("✓ Resolved 'tale': took the server's version", out:text(), 1, true)
      assert.equals("Remote tale", store():load_story("tale").title)
      assert.equals(0, run("conflicts"))
      assert.matches("^No unresolved conflicts\n", out:text())
    end)

    it("explains a wrong resolve command", function()
      make_conflict()
      assert.equals(1, run("conflicts", "resolve", "tale"))
      assert.matches("%-%-use must be local, remote or both", err:text())
      assert.equals(1, run("conflicts", "resolve", "nope", "--use", "local"))
      assert.matches("no unresolved conflict for story 'nope'", err:text())
      assert.equals(1, run("conflicts", "bogus"))
      assert.matches("unknown conflicts action 'bogus'", err:text())
    end)
  end)

  it("uses whisker-sync's own store when whisker-core is not installed", function()
    local saved = package.preload["whisker.storage"]
    package.preload["whisker.storage"] = function()
      error("not installed")
    end
    package.loaded["whisker.storage"] = nil
    assert.equals(0, run("status"))
    package.preload["whisker.storage"] = saved
    assert.matches("Storage: .*%(whisker%-sync file store%)", out:text())
  end)

  it("follows whisker-core's command convention (run, help)", function()
    assert.is_function(SyncCommand.run)
    assert.is_function(SyncCommand.help)
  end)
end)
