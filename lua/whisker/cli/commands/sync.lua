--- The `whisker sync` command: configure sync, sync now, run auto-sync in the
-- foreground, inspect status, statistics and conflicts.
--
--     whisker sync config --url <url> --key <key> [--transport http|websocket]
--                         [--interval <ms>] [--device-name <name>] [--strategy <s>]
--                         [--only <patterns>] [--tags <tags>] [--all]
--     whisker sync now | start | stop | status [--json] | stats [--json]
--     whisker sync reset [--yes]
--     whisker sync conflicts [--json]
--     whisker sync conflicts resolve <story_id> --use local|remote|both
--     whisker sync assets [--json] | assets add <file> [<name>]
--
-- The configuration lives in `.whisker-sync-config.json` (the instance's
-- `_config_path`, created with mode 0600 because it holds the API key); the
-- stories in `.whisker-storage` (the instance's `_storage_path`), opened with
-- whisker-core's StorageService when `whisker.storage` can be loaded and with
-- whisker-sync's own file store (same layout) otherwise. A running
-- `whisker sync start` keeps its pid in `<storage>/.whisker-sync.pid`;
-- `whisker sync stop` asks it to stop through `<storage>/.whisker-sync.stop`.
--
-- Every `cmd_*` method and `execute` return the process exit code: 0 on
-- success, 1 on any failure (after one `Error: …` line on stderr).
-- @module whisker.cli.commands.sync

-- luacheck: ignore 212/self (every command is a method, some need no state)

local files = require("whisker.sync.files")

local SyncCommand = {}
SyncCommand.__index = SyncCommand

--- Transports `--transport` accepts.
SyncCommand.TRANSPORTS = { "http", "websocket" }

--- Conflict strategies `--strategy` accepts.
SyncCommand.STRATEGIES = { "last_write_wins", "auto_merge", "keep_both", "manual" }

--- Choices `conflicts resolve --use` accepts.
SyncCommand.RESOLUTIONS = { "local", "remote", "both" }

--- Default sync interval, milliseconds.
SyncCommand.DEFAULT_INTERVAL = 60000

--- Smallest sync interval accepted, milliseconds.
SyncCommand.MIN_INTERVAL = 100

--- Default HTTP timeout per attempt, milliseconds (the config's `timeout`).
SyncCommand.DEFAULT_TIMEOUT_MS = 30000

--- Seconds `stop` waits for the running sync to exit.
SyncCommand.STOP_TIMEOUT = 15

local RULE = "───────────"

-- Options that take a value: flag → parsed field.
local VALUE_FLAGS = {
  ["--url"] = "url",
  ["--key"] = "key",
  ["--transport"] = "transport",
  ["--interval"] = "sync_interval",
  ["--device-name"] = "device_name",
  ["--strategy"] = "conflict_strategy",
  ["--use"] = "use",
  ["--only"] = "only",
  ["--tags"] = "tags",
}

-- Options whose value is a comma-separated list.
local LIST_FIELDS = { only = true, tags = true }

-- Options without a value: flag → parsed field (set to true).
local SWITCHES = {
  ["--json"] = "json",
  ["--yes"] = "yes",
  ["-y"] = "yes",
  ["--all"] = "all",
  ["--help"] = "help",
  ["-h"] = "help",
}

-- Fields each subcommand accepts (anything else given is an error), and
-- whether it takes positional arguments.
local ACCEPTS = {
  config = { url = true, key = true, transport = true, sync_interval = true, device_name = true,
    conflict_strategy = true, only = true, tags = true, all = true },
  start = {},
  stop = {},
  now = {},
  status = { json = true },
  stats = { json = true },
  reset = { yes = true },
  conflicts = { json = true, use = true, positional = true },
  assets = { json = true, positional = true },
}

local FLAG_OF = {}
for flag, field in pairs(VALUE_FLAGS) do
  FLAG_OF[field] = flag
end
for flag, field in pairs(SWITCHES) do
  if flag:sub(1, 2) == "--" then
    FLAG_OF[field] = flag
  end
end

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

local function try_require(name)
  local ok, module = pcall(require, name)
  if ok then
    return module
  end
  return nil, module
end

local function contains(list, value)
  for _, item in ipairs(list) do
    if item == value then
      return true
    end
  end
  return false
end

--- An error value as one line without Lua's "file:line: " prefix.
local function clean(err)
  local text = tostring(err)
  text = text:gsub("^[^\n:]+%.lua:%d+: ", "")
  return (text:gsub("\n.*", ""))
end

local function is_interrupt(err)
  return tostring(err):find("interrupted!", 1, true) ~= nil
end

--- A number as an integer string on every Lua flavour.
local function int(n)
  n = tonumber(n) or 0
  if n ~= n or n == math.huge or n == -math.huge then
    return "0"
  end
  return string.format("%d", math.floor(n))
end

local shell_quote = files.shell_quote

--- Runs a shell command; true when it exits with status 0.
local function run_ok(command)
  local a, _, code = os.execute(command)
  if type(a) == "number" then
    return a == 0
  end
  return a == true and (code == nil or code == 0)
end

local read_file, file_exists = files.read, files.exists

--- The native module, or nil and why not.
local function native_module()
  return try_require("whisker.storage.sync.native")
end

--- JSON functions: the native module's, else cjson's. Each returns
-- `value` or `nil, message`.
local function json_codec()
  local native = native_module()
  if native and native.json then
    return {
      encode = function(value, array_fields)
        return native.json.encode(value, array_fields)
      end,
      decode = function(text)
        return native.json.decode(text, "empty file")
      end,
    }
  end
  local cjson = try_require("cjson")
  if cjson then
    return {
      encode = function(value)
        local ok, result = pcall(cjson.encode, value)
        if ok then
          return result
        end
        return nil, tostring(result)
      end,
      decode = function(text)
        local ok, result = pcall(cjson.decode, text)
        if ok then
          return result
        end
        return nil, tostring(result)
      end,
    }
  end
  return nil
end

--- Seconds on a monotonic clock (wall-clock time, not CPU time).
local function monotonic()
  local native = native_module()
  if native and native.websocket and native.websocket.clock then
    return native.websocket.clock()
  end
  return os.time()
end

local function sleep(seconds)
  local native = native_module()
  if native and native.websocket and native.websocket.sleep then
    native.websocket.sleep(seconds)
  else
    os.execute("sleep " .. tostring(seconds))
  end
end

--- This process's id.
local function current_pid()
  local stat = read_file("/proc/self/stat")
  local pid = stat and tonumber(stat:match("^(%d+)"))
  if pid then
    return pid
  end
  local pipe = io.popen("echo $PPID")
  if pipe then
    pid = tonumber(pipe:read("*l") or "")
    pipe:close()
  end
  return pid
end

--- Whether a process with this id is alive (zombies count as gone).
local function process_alive(pid)
  if file_exists("/proc/self/stat") then
    local stat = read_file("/proc/" .. int(pid) .. "/stat")
    if not stat then
      return false
    end
    local state = stat:match("%)%s+(%a)")
    return state ~= "Z" and state ~= "X"
  end
  return run_ok("kill -0 " .. int(pid) .. " 2>/dev/null")
end

--- Writes `text` to `path` with mode 0600 (through a temporary file renamed over `path`).
local function write_private(path, text)
  local temp = path .. ".tmp-" .. (tostring({}):match("0x(%x+)") or "x")
  local file, err = io.open(temp, "w")
  if not file then
    return false, err
  end
  file:close()
  run_ok("chmod 600 " .. shell_quote(temp) .. " 2>/dev/null")
  file, err = io.open(temp, "w")
  if not file then
    os.remove(temp)
    return false, err
  end
  local ok, write_err = file:write(text)
  file:close()
  if not ok then
    os.remove(temp)
    return false, write_err
  end
  local renamed, rename_err = os.rename(temp, path)
  if not renamed then
    os.remove(temp)
    return false, rename_err
  end
  return true
end

--- The selective-sync subset of a configuration, in words.
local function describe_subset(config)
  local parts = {}
  if type(config.only) == "table" and #config.only > 0 then
    parts[#parts + 1] = "stories matching " .. table.concat(config.only, ", ")
  end
  if type(config.tags) == "table" and #config.tags > 0 then
    parts[#parts + 1] = "stories tagged " .. table.concat(config.tags, ", ")
  end
  if #parts == 0 then
    return "all stories"
  end
  return table.concat(parts, " or ")
end

--- The HTTP base URL for a configured URL (a `ws://…/ws` URL is mapped back).
local function http_url(url)
  if url:match("^wss?://") then
    url = url:gsub("^ws", "http"):gsub("/ws/?$", "")
  end
  return (url:gsub("/+$", ""))
end

--- The WebSocket URL for a configured URL (`http://host` → `ws://host/ws`).
local function ws_url(url)
  if url:match("^https?://") then
    return (url:gsub("^http", "ws"):gsub("/+$", "")) .. "/ws"
  end
  return url
end

local function clock_time(timestamp)
  return os.date("%H:%M:%S", timestamp or os.time())
end

---------------------------------------------------------------------------
-- Construction, output, configuration
---------------------------------------------------------------------------

--- Creates the command.
-- @return SyncCommand with `_config_path = ".whisker-sync-config.json"` and
--   `_storage_path = ".whisker-storage"` (both relative to the current directory)
function SyncCommand.new()
  local self = setmetatable({}, SyncCommand)
  self._config_path = ".whisker-sync-config.json"
  self._storage_path = ".whisker-storage"
  return self
end

--- Runs the command with arguments (whisker-core's `Command.run(args)` convention).
-- @param args array of arguments, the subcommand first
-- @return exit code
function SyncCommand.run(args)
  return SyncCommand.new():execute(args or {})
end

--- Prints the help (whisker-core's `Command.help()` convention).
-- @return 0
function SyncCommand.help()
  return SyncCommand.new():cmd_help()
end

--- Writes one line to stdout.
function SyncCommand:_print(text)
  local out = self._stdout or io.stdout
  out:write(text or "", "\n")
end

--- Writes one line to stderr.
function SyncCommand:_warn(text)
  local err = self._stderr or io.stderr
  err:write(text, "\n")
end

--- Reports a failure: one `Error: …` line on stderr. Returns exit code 1.
function SyncCommand:_fail(message)
  self:_warn("Error: " .. clean(message))
  return 1
end

--- Loads the configuration file (`self._config_path`).
-- @return config table, or nil and a message
function SyncCommand:load_config()
  local json = json_codec()
  if not json then
    return nil, "no JSON library available (the whisker-sync native module is not installed)"
  end
  local text = read_file(self._config_path)
  if not text then
    return nil, "Configuration file not found. Run 'whisker sync config' first."
  end
  local config = json.decode(text)
  if type(config) ~= "table" then
    return nil, "Invalid configuration file " .. self._config_path
  end
  return config
end

--- Saves the configuration file (mode 0600: it holds the API key).
-- @param config table
-- @return true, or false and a message
function SyncCommand:save_config(config)
  local json = json_codec()
  if not json then
    return false, "no JSON library available (the whisker-sync native module is not installed)"
  end
  local keys = {}
  for key in pairs(config) do
    keys[#keys + 1] = tostring(key)
  end
  table.sort(keys)
  local lines = {}
  for _, key in ipairs(keys) do
    local name = json.encode(key)
    local value, err = json.encode(config[key])
    if not value then
      return false, "Cannot write configuration file: " .. tostring(err)
    end
    lines[#lines + 1] = "  " .. name .. ": " .. value
  end
  local text = "{\n" .. table.concat(lines, ",\n") .. "\n}\n"
  local ok, err = write_private(self._config_path, text)
  if not ok then
    return false, "Cannot write configuration file " .. self._config_path .. ": " .. tostring(err)
  end
  return true
end

---------------------------------------------------------------------------
-- Storage, engine, transport
---------------------------------------------------------------------------

--- Opens the story storage in `self._storage_path`: whisker-core's
-- StorageService (filesystem backend) when `whisker.storage` loads, else
-- whisker-sync's file store. Sets `self._storage_kind`.
-- @return storage, or nil and a message
function SyncCommand:create_storage()
  local Storage = try_require("whisker.storage")
  if type(Storage) == "table" and type(Storage.new) == "function" then
    local ok, storage = pcall(Storage.new, { backend = "filesystem", path = self._storage_path })
    if ok and type(storage) == "table" then
      local init_ok, err = storage:initialize()
      if not init_ok then
        return nil, ("cannot open the story storage %s: %s"):format(self._storage_path, tostring(err))
      end
      self._storage_kind = "whisker-core StorageService"
      return storage
    end
  end
  local FileStore, load_err = try_require("whisker.sync.file_store")
  if not FileStore then
    return nil, "Storage module not available: " .. clean(load_err)
  end
  local storage = FileStore.new({ path = self._storage_path })
  local ok, err = storage:initialize()
  if not ok then
    return nil, ("cannot open the story storage %s: %s"):format(self._storage_path, tostring(err))
  end
  self._storage_kind = "whisker-sync file store"
  return storage
end

--- Opens the sync state kept in a storage.
-- @return state manager, or nil and a message
function SyncCommand:create_state_manager(storage)
  local StateManager = try_require("whisker.storage.sync.state_manager")
  if not StateManager then
    return nil, "State manager not available"
  end
  local ok, manager = pcall(StateManager.new, storage)
  if not ok then
    return nil, "cannot open the sync state: " .. clean(manager)
  end
  return manager
end

--- Creates the transport a configuration names. HTTP `timeout` in the
-- configuration is milliseconds (default 30000); the transport takes seconds.
-- @param config the configuration
-- @param device_id this device's id (the WebSocket sends it when authenticating)
-- @return transport, or nil and a message
function SyncCommand:create_transport(config, device_id)
  local transport_type = config.transport or "http"
  if type(config.url) ~= "string" or type(config.api_key) ~= "string" then
    return nil, "the configuration has no server URL or API key; run 'whisker sync config --url <url> --key <key>'"
  end
  if transport_type == "http" then
    local HTTPTransport = try_require("whisker.storage.sync.transports.http")
    if not HTTPTransport then
      return nil, "HTTP transport not available"
    end
    local timeout_ms = tonumber(config.timeout) or SyncCommand.DEFAULT_TIMEOUT_MS
    local ok, transport = pcall(HTTPTransport.new, {
      base_url = http_url(config.url),
      api_key = config.api_key,
      timeout = timeout_ms / 1000,
      max_retries = tonumber(config.max_retries),
      retry_delay = tonumber(config.retry_delay),
    })
    if not ok then
      return nil, clean(transport)
    end
    return transport
  elseif transport_type == "websocket" then
    local WebSocketTransport = try_require("whisker.storage.sync.transports.websocket")
    if not WebSocketTransport then
      return nil, "WebSocket transport not available"
    end
    local ok, transport = pcall(WebSocketTransport.new, {
      ws_url = ws_url(config.url),
      api_key = config.api_key,
      reconnect = true,
      device_id = device_id,
    })
    if not ok then
      return nil, clean(transport)
    end
    return transport
  end
  return nil, "Unknown transport type: " .. tostring(transport_type)
end

--- Creates the sync engine for a configuration and storage, with the state
-- manager it records into.
-- @return engine and state manager, or nil and a message
function SyncCommand:create_sync_engine(config, storage)
  local SyncEngine = try_require("whisker.storage.sync.engine")
  local StateManager = try_require("whisker.storage.sync.state_manager")
  if not SyncEngine or not StateManager then
    return nil, "Sync engine not available"
  end
  local state_mgr, err = self:create_state_manager(storage)
  if not state_mgr then
    return nil, err
  end
  local device_id = state_mgr:get_device_id()
  local transport
  if config then
    transport, err = self:create_transport(config, device_id)
    if not transport then
      return nil, err
    end
  end
  local ok, engine = pcall(SyncEngine.new, {
    storage = storage,
    transport = transport,
    state_manager = state_mgr,
    device_id = device_id,
    sync_interval = config and tonumber(config.sync_interval) or SyncCommand.DEFAULT_INTERVAL,
    conflict_strategy = config and config.conflict_strategy or "last_write_wins",
    selective = config and { stories = config.only, tags = config.tags } or nil,
  })
  if not ok then
    return nil, clean(engine)
  end
  self._transport = transport
  return engine, state_mgr
end

--- Connects (and authenticates) a transport that needs it (WebSocket).
-- @return true, or nil and a message
function SyncCommand:_connect(transport)
  if type(transport) ~= "table" or type(transport.connect) ~= "function" then
    return true
  end
  if type(transport.is_connected) == "function" and transport:is_connected() then
    return true
  end
  local ok, result, err = pcall(transport.connect, transport)
  if not ok then
    return nil, clean(result)
  end
  if not result then
    return nil, tostring(err or "cannot connect to the sync server")
  end
  return true
end

--- Makes a storage see changes other processes wrote since it was opened
-- (whisker-sync's file store re-reads its index; whisker-core's
-- StorageService keeps its index and a cache in memory, so both are reloaded).
local function refresh_storage(storage)
  if type(storage.refresh) == "function" then
    storage:refresh()
    return
  end
  local backend = storage.backend
  local impl = type(backend) == "table" and rawget(backend, "_impl")
  if type(impl) == "table" and type(impl.initialize) == "function" and type(storage.cache_clear) == "function" then
    impl:initialize()
    storage:cache_clear()
  end
end

local function disconnect(transport)
  if type(transport) == "table" and type(transport.disconnect) == "function" then
    pcall(transport.disconnect, transport)
  end
end

---------------------------------------------------------------------------
-- The running-sync files
---------------------------------------------------------------------------

function SyncCommand:_pid_path()
  return self._storage_path .. "/.whisker-sync.pid"
end

function SyncCommand:_stop_path()
  return self._storage_path .. "/.whisker-sync.stop"
end

--- The pid of the `whisker sync start` running on this folder, or nil (and
-- true when a stale pid file was removed).
function SyncCommand:_running_pid()
  local text = read_file(self:_pid_path())
  if not text then
    return nil
  end
  local pid = tonumber(text:match("%d+"))
  if pid and pid ~= current_pid() and process_alive(pid) then
    return pid
  end
  os.remove(self:_pid_path())
  return nil, true
end

--- Refuses to go on while `whisker sync start` runs on this folder (two
-- processes must not write the same sync state).
-- @return nil, or an exit code after reporting
function SyncCommand:_refuse_if_running(what)
  local pid = self:_running_pid()
  if pid then
    return self:_fail(("auto-sync is running on this folder (pid %d); run 'whisker sync stop' before %s")
      :format(pid, what))
  end
  return nil
end

---------------------------------------------------------------------------
-- Arguments and formatting
---------------------------------------------------------------------------

--- Parses arguments: `args[1]` is the subcommand; options follow.
-- Problems are collected in `parsed.errors` (reported by `execute`).
-- @param args array of strings
-- @return parsed table: `subcommand`, `url`, `key`, `transport` ("http"),
--   `sync_interval` (60000), `device_name`, `conflict_strategy`
--   ("last_write_wins"), `json`, `yes`, `use`, `positional`, `errors`, and
--   `_given` (the fields given explicitly)
function SyncCommand:parse_args(args)
  local parsed = {
    subcommand = args[1],
    url = nil,
    key = nil,
    transport = "http",
    sync_interval = SyncCommand.DEFAULT_INTERVAL,
    device_name = nil,
    conflict_strategy = "last_write_wins",
    positional = {},
    errors = {},
    _given = {},
  }
  local i = 2
  while i <= #args do
    local arg = tostring(args[i])
    local flag, inline = arg:match("^(%-%-[%w%-]+)=(.*)$")
    flag = flag or arg
    local field = VALUE_FLAGS[flag]
    if field then
      local value = inline
      if value == nil then
        i = i + 1
        value = args[i]
      end
      if value == nil then
        parsed.errors[#parsed.errors + 1] = flag .. " needs a value"
      elseif field == "sync_interval" then
        local n = tonumber(value)
        if not n or n ~= n or n == math.huge or n < SyncCommand.MIN_INTERVAL then
          parsed.errors[#parsed.errors + 1] = ("--interval must be a number of milliseconds (at least %d), got '%s'")
            :format(SyncCommand.MIN_INTERVAL, tostring(value))
        else
          parsed.sync_interval = math.floor(n)
          parsed._given.sync_interval = true
        end
      elseif LIST_FIELDS[field] then
        local items = {}
        for item in tostring(value):gmatch("[^,]+") do
          item = item:match("^%s*(.-)%s*$")
          if item ~= "" then
            items[#items + 1] = item
          end
        end
        if #items == 0 then
          parsed.errors[#parsed.errors + 1] = flag .. " needs at least one name"
        else
          parsed[field] = items
          parsed._given[field] = true
        end
      else
        parsed[field] = value
        parsed._given[field] = true
      end
    elseif SWITCHES[arg] then
      parsed[SWITCHES[arg]] = true
      parsed._given[SWITCHES[arg]] = true
    elseif arg:sub(1, 1) == "-" and #arg > 1 then
      parsed.errors[#parsed.errors + 1] = ("unknown option '%s' (see 'whisker sync help')"):format(arg)
    else
      parsed.positional[#parsed.positional + 1] = arg
    end
    i = i + 1
  end
  return parsed
end

--- Formats a byte count: `"100 B"`, `"5.5 KB"`, `"2.5 MB"` (1024-based).
-- @param bytes number
-- @return string
function SyncCommand:format_bytes(bytes)
  bytes = tonumber(bytes) or 0
  if bytes < 1024 then
    return int(bytes) .. " B"
  elseif bytes < 1024 * 1024 then
    return string.format("%.1f KB", bytes / 1024)
  elseif bytes < 1024 * 1024 * 1024 then
    return string.format("%.1f MB", bytes / (1024 * 1024))
  end
  return string.format("%.1f GB", bytes / (1024 * 1024 * 1024))
end

--- Formats an age in seconds: `"30 seconds ago"`, `"5 minutes ago"`,
-- `"2 hours ago"`, `"1 days ago"` (the old wording, kept).
-- @param seconds number
-- @return string
function SyncCommand:format_duration(seconds)
  seconds = math.max(0, math.floor(tonumber(seconds) or 0))
  if seconds < 60 then
    return int(seconds) .. " seconds ago"
  elseif seconds < 3600 then
    return int(seconds / 60) .. " minutes ago"
  elseif seconds < 86400 then
    return int(seconds / 3600) .. " hours ago"
  end
  return int(seconds / 86400) .. " days ago"
end

---------------------------------------------------------------------------
-- Dispatch
---------------------------------------------------------------------------

local COMMANDS = {
  config = "cmd_config",
  start = "cmd_start",
  stop = "cmd_stop",
  now = "cmd_now",
  status = "cmd_status",
  stats = "cmd_stats",
  reset = "cmd_reset",
  conflicts = "cmd_conflicts",
  assets = "cmd_assets",
}

--- Runs a subcommand.
-- @param args array: the subcommand, then its options
-- @return exit code (an unknown subcommand prints the help and returns 0)
function SyncCommand:execute(args)
  args = args or {}
  local first = args[1]
  if #args == 0 or first == "help" or first == "--help" or first == "-h" then
    return self:cmd_help()
  end
  local parsed = self:parse_args(args)
  local method = COMMANDS[parsed.subcommand]
  if not method then
    self:_print("Unknown subcommand: " .. tostring(parsed.subcommand))
    return self:cmd_help()
  end
  if parsed.help then
    return self:cmd_help()
  end
  if #parsed.errors > 0 then
    return self:_fail(parsed.errors[1])
  end
  local accepts = ACCEPTS[parsed.subcommand]
  for field in pairs(parsed._given) do
    if not accepts[field] then
      return self:_fail(("option %s does not apply to 'whisker sync %s'")
        :format(FLAG_OF[field] or field, parsed.subcommand))
    end
  end
  if #parsed.positional > 0 and not accepts.positional then
    return self:_fail(("unexpected argument '%s' for 'whisker sync %s'")
      :format(parsed.positional[1], parsed.subcommand))
  end
  return self[method](self, parsed)
end

--- Prints the help.
-- @return 0
function SyncCommand:cmd_help()
  self:_print([[
Whisker Sync - Cross-device story synchronization

Usage: whisker sync <command> [options]

Commands:
  config      Configure sync settings
  start       Start sync service (auto-sync in the foreground until stopped)
  stop        Stop sync service (the 'start' running on this folder)
  now         Force immediate sync
  status      Show sync status
  stats       Show sync statistics
  reset       Reset sync state (stories are kept)
  conflicts   List conflicts waiting for you, or resolve one
  assets      List the assets stories reference, or add one ('assets add <file>')
  help        Show this help

Examples:
  # Configure sync
  whisker sync config --url https://sync.example.com --key API_KEY

  # Sync every 30 seconds until Ctrl+C or 'whisker sync stop'
  whisker sync start

  # Force immediate sync
  whisker sync now

  # Check status / view statistics (add --json for scripts)
  whisker sync status
  whisker sync stats

  # Sync only some stories on this device
  whisker sync config --only 'chapter-*' --tags published

  # Resolve a conflict (with --strategy manual)
  whisker sync conflicts
  whisker sync conflicts resolve my-story --use local

  # Add an image to the assets folder and print the reference for a story
  whisker sync assets add ~/pictures/cave.png

Options:
  --url <url>              Sync server URL
  --key <key>              API key for authentication
  --transport <type>       Transport type: http or websocket (default: http)
  --interval <ms>          Sync interval in milliseconds (default: 60000)
  --device-name <name>     Device name for identification
  --strategy <strategy>    Conflict resolution strategy: last_write_wins,
                           auto_merge, keep_both or manual (default: last_write_wins)
  --json                   Machine-readable output (status, stats, conflicts)
  --yes, -y                Reset without asking
  --use <version>          For 'conflicts resolve': local, remote or both
  --only <patterns>        Sync only stories whose id matches (comma-separated,
                           * and ? wildcards), e.g. --only 'chapter-*,intro'
  --tags <tags>            Sync only stories with one of these tags (with
                           --only: stories matching either)
  --all                    Sync every story again (clears --only and --tags)]])
  return 0
end

---------------------------------------------------------------------------
-- config
---------------------------------------------------------------------------

--- `whisker sync config`: writes the configuration. Fields not given are
-- kept from an existing configuration; URL and key are required unless the
-- configuration already has them.
-- @param parsed parsed arguments
-- @return exit code
function SyncCommand:cmd_config(parsed)
  local given = function(field)
    if parsed._given then
      return parsed._given[field] == true
    end
    return parsed[field] ~= nil
  end
  local existing = {}
  if file_exists(self._config_path) then
    local loaded, err = self:load_config()
    if loaded then
      existing = loaded
    else
      self:_warn("Warning: " .. err .. " (replacing it)")
    end
  end
  local config = {}
  for k, v in pairs(existing) do
    config[k] = v
  end
  local function take(field, from, default)
    if given(from) then
      config[field] = parsed[from]
    elseif config[field] == nil then
      config[field] = default
    end
  end
  take("url", "url", nil)
  take("api_key", "key", nil)
  take("transport", "transport", "http")
  take("sync_interval", "sync_interval", SyncCommand.DEFAULT_INTERVAL)
  take("device_name", "device_name", "Unknown Device")
  take("conflict_strategy", "conflict_strategy", "last_write_wins")
  if given("all") then
    config.only, config.tags = nil, nil
  end
  if given("only") then
    config.only = parsed.only
  end
  if given("tags") then
    config.tags = parsed.tags
  end

  if type(config.url) ~= "string" or config.url == "" then
    return self:_fail("--url is required")
  end
  if type(config.api_key) ~= "string" or config.api_key == "" then
    return self:_fail("--key is required")
  end
  if not (config.url:match("^https?://[^/]") or config.url:match("^wss?://[^/]")) then
    return self:_fail(("--url must start with http://, https://, ws:// or wss://, got '%s'"):format(config.url))
  end
  if not contains(SyncCommand.TRANSPORTS, config.transport) then
    return self:_fail(("unknown transport '%s' (use http or websocket)"):format(tostring(config.transport)))
  end
  if not contains(SyncCommand.STRATEGIES, config.conflict_strategy) then
    return self:_fail(("unknown conflict strategy '%s' (use %s)")
      :format(tostring(config.conflict_strategy), table.concat(SyncCommand.STRATEGIES, ", ")))
  end
  local interval = tonumber(config.sync_interval)
  if not interval or interval ~= interval or interval < SyncCommand.MIN_INTERVAL or interval == math.huge then
    return self:_fail(("--interval must be a number of milliseconds (at least %d), got '%s'")
      :format(SyncCommand.MIN_INTERVAL, tostring(config.sync_interval)))
  end
  config.sync_interval = math.floor(interval)

  local ok, err = self:save_config(config)
  if not ok then
    return self:_fail(err)
  end
  self:_print("✓ Sync configured successfully")
  self:_print("  URL: " .. config.url)
  self:_print("  Transport: " .. config.transport)
  self:_print("  Interval: " .. int(config.sync_interval) .. "ms")
  self:_print("  Strategy: " .. config.conflict_strategy)
  self:_print("  Device name: " .. tostring(config.device_name))
  self:_print("  Syncing: " .. describe_subset(config))
  return 0
end

---------------------------------------------------------------------------
-- now
---------------------------------------------------------------------------

--- Whether stdout (fd 1; `fd` to ask about another) is a terminal.
function SyncCommand:_is_tty(fd)
  if self._tty ~= nil then
    return self._tty
  end
  local term = os.getenv("TERM")
  if term == nil or term == "" or term == "dumb" then
    return false
  end
  return run_ok(("test -t %d"):format(fd or 1))
end

local BAR_WIDTH = 30

-- Seconds between two checks of the auto-sync loop (stop request, due sync,
-- pushed remote change).
local POLL_SLICE = 0.25

--- Draws the progress bar for a `sync_progress` event.
function SyncCommand:_draw_progress(progress)
  local total = tonumber(progress.total) or 100
  local fraction = total > 0 and (tonumber(progress.current) or 0) / total or 0
  fraction = math.max(0, math.min(1, fraction))
  local filled = math.floor(fraction * BAR_WIDTH + 0.5)
  local label = tostring(progress.operation or ""):gsub("_", " ")
  local items_total = tonumber(progress.items_total) or 0
  if items_total > 0 then
    label = label .. (" %s/%s"):format(int(progress.items_done), int(items_total))
  end
  local out = self._stdout or io.stdout
  out:write(("\r[%s%s] %3s%% %-34s"):format(("#"):rep(filled), ("-"):rep(BAR_WIDTH - filled),
    int(fraction * 100), label:sub(1, 34)))
  out:flush()
end

function SyncCommand:_clear_progress()
  local out = self._stdout or io.stdout
  out:write("\r", (" "):rep(BAR_WIDTH + 42), "\r")
  out:flush()
end

--- Opens everything a sync needs: `{config, storage, engine, state, transport}`.
-- @return context, or nil and a message
function SyncCommand:_open_sync(config)
  local storage, err = self:create_storage()
  if not storage then
    return nil, err
  end
  local engine, state_mgr = self:create_sync_engine(config, storage)
  if not engine then
    return nil, state_mgr
  end
  return { config = config, storage = storage, engine = engine, state = state_mgr, transport = self._transport }
end

--- What `now` and `start` begin with: the configuration, the refusal while
-- auto-sync runs on this folder, and everything a sync needs.
-- @param what what is refused while auto-sync runs ("syncing by hand", …)
-- @return context (see `_open_sync`), or nil and an exit code after reporting
function SyncCommand:_begin_sync(what)
  local config, err = self:load_config()
  if not config then
    return nil, self:_fail(err)
  end
  local refused = self:_refuse_if_running(what)
  if refused then
    return nil, refused
  end
  local ctx
  ctx, err = self:_open_sync(config)
  if not ctx then
    return nil, self:_fail(err)
  end
  return ctx
end

--- Wraps an event listener: its failures are reported on stderr, and a
-- Ctrl-C that lands in it is remembered instead of lost.
function SyncCommand:_listener(fn)
  return function(data)
    local ok, err = pcall(fn, data)
    if not ok then
      if is_interrupt(err) then
        self._interrupted = true
      else
        self:_warn("whisker-sync: " .. clean(err))
      end
    end
  end
end

--- The asset syncer of a sync context (`whisker.sync.assets`), or nil when
-- that module is missing. It moves assets through the context's transport
-- when that can (HTTP), else through an HTTP transport to the configured
-- server, created only when an asset has to move.
-- @param ctx context from `_open_sync`
-- @return Assets or nil
function SyncCommand:_assets(ctx)
  local Assets = try_require("whisker.sync.assets")
  if not Assets then
    return nil
  end
  local config = ctx.config or {}
  local server = type(config.url) == "string" and http_url(config.url) or nil
  local transport = ctx.transport
  if type(transport) ~= "table" or type(transport.put_asset) ~= "function" then
    transport = nil
  end
  return Assets.new({
    root = self._storage_path,
    storage = ctx.storage,
    server = server,
    transport = transport,
    connect = function()
      return self:create_transport({ url = server, api_key = config.api_key, transport = "http",
        timeout = config.timeout, max_retries = config.max_retries, retry_delay = config.retry_delay })
    end,
  })
end

--- Runs `assets:upload()` or `assets:download()`; a failure becomes a
-- reported problem instead of stopping the sync (Ctrl+C still stops it).
-- @return the pass's result
local function asset_pass(assets, which)
  if not assets then
    return nil
  end
  local ok, result = pcall(assets[which], assets)
  if ok then
    return result
  end
  if is_interrupt(result) then
    error("interrupted!", 0)
  end
  return { uploaded = 0, downloaded = 0, sent = 0, received = 0, problems = { clean(result) } }
end

--- Prints what an upload and a download pass of assets did.
-- @param up result of `Assets:upload` (or nil)
-- @param down result of `Assets:download` (or nil)
-- @param prefix start of each line
-- @return 0, or 1 when some asset could not be moved
function SyncCommand:_report_assets(up, down, prefix)
  local parts, problems = {}, {}
  local unsupported = false
  for _, result in ipairs({ up or false, down or false }) do
    if result then
      unsupported = unsupported or result.unsupported
      for _, problem in ipairs(result.problems or {}) do
        problems[#problems + 1] = problem
      end
    end
  end
  if up and up.uploaded > 0 then
    parts[#parts + 1] = ("%s uploaded (%s)"):format(int(up.uploaded), self:format_bytes(up.sent))
  end
  if down and down.downloaded > 0 then
    parts[#parts + 1] = ("%s downloaded (%s)"):format(int(down.downloaded), self:format_bytes(down.received))
  end
  if #parts > 0 then
    self:_print(prefix .. "assets: " .. table.concat(parts, ", "))
  end
  if unsupported then
    self:_warn(prefix .. "assets: the server does not store assets; stories were synced without them")
  end
  for _, problem in ipairs(problems) do
    self:_warn(prefix .. "✗ asset " .. problem)
  end
  return #problems > 0 and 1 or 0
end

--- "N received, N sent[, N conflicts resolved]" for a `sync_completed` event.
local function summary_text(event, auto_resolved)
  local text = ("%s received, %s sent"):format(int(event.operations_applied), int(event.operations_pushed))
  if auto_resolved > 0 then
    text = text .. (", %s conflicts resolved"):format(int(auto_resolved))
  end
  return text
end

local function describe_resolution(event)
  local winner = event.resolution and event.resolution.winner
  if not event.auto_resolved or winner == nil then
    return "left for you (whisker sync conflicts)"
  end
  local words = {
    ["local"] = "kept this device's version",
    remote = "took the server's version",
    merged = "merged both versions",
    both = "kept both versions",
  }
  return words[winner] or ("resolved (" .. tostring(winner) .. ")")
end

--- `whisker sync now`: one sync, with a progress bar on a terminal.
-- @return exit code
function SyncCommand:cmd_now()
  local ctx, code = self:_begin_sync("syncing by hand")
  if not ctx then
    return code
  end
  local engine = ctx.engine
  local tty = self:_is_tty(1)
  local summary
  local conflicts = {}
  local auto_resolved = 0
  engine:on("sync_completed", self:_listener(function(event)
    summary = event
  end))
  engine:on("conflict_detected", self:_listener(function(event)
    local id = event.conflict and event.conflict.story_id
    if event.auto_resolved then
      auto_resolved = auto_resolved + 1
    end
    conflicts[#conflicts + 1] = ("  conflict on '%s': %s"):format(tostring(id), describe_resolution(event))
  end))
  if tty then
    engine:on("sync_progress", self:_listener(function(progress)
      self:_draw_progress(progress)
    end))
  end

  self:_print("Syncing...")
  local started = monotonic()
  local ok, sync_err = self:_connect(ctx.transport)
  local assets = self:_assets(ctx)
  local moved = {}
  if ok then
    moved[1] = asset_pass(assets, "upload")
    ok, sync_err = engine:sync_now()
    moved[2] = ok and asset_pass(assets, "download") or nil
  else
    sync_err = "cannot connect to the sync server: " .. tostring(sync_err)
    ctx.state:record_error(sync_err)
  end
  local duration = monotonic() - started
  if tty then
    self:_clear_progress()
  end
  disconnect(ctx.transport)
  if self._interrupted or is_interrupt(sync_err) then
    error("interrupted!", 0)
  end
  if not ok then
    self:_warn("✗ Sync failed: " .. clean(sync_err))
    return 1
  end
  self:_print(string.format("✓ Sync complete (%.2fs)", duration))
  if summary then
    self:_print("  " .. summary_text(summary, auto_resolved))
  end
  for _, line in ipairs(conflicts) do
    self:_print(line)
  end
  local held = engine:get_conflicts()
  if #held > 0 then
    self:_print(("  %d conflict(s) need your decision: run 'whisker sync conflicts'"):format(#held))
  end
  return self:_report_assets(moved[1], moved[2], "  ")
end

---------------------------------------------------------------------------
-- start / stop
---------------------------------------------------------------------------

--- `whisker sync start`: syncs now, then every interval and whenever the
-- server pushes a change (WebSocket), printing one line per sync, until
-- Ctrl+C or `whisker sync stop`.
-- @return exit code
function SyncCommand:cmd_start()
  local ctx, code = self:_begin_sync("starting another one")
  if not ctx then
    return code
  end
  local config = ctx.config
  local pid = current_pid() or 0
  local wrote, write_err = write_private(self:_pid_path(), int(pid) .. "\n")
  if not wrote then
    return self:_fail("cannot write " .. self:_pid_path() .. ": " .. tostring(write_err))
  end
  os.remove(self:_stop_path())

  local engine = ctx.engine
  self._interrupted = false
  local auto_resolved, held = 0, 0
  engine:on("sync_completed", self:_listener(function(event)
    local applied = tonumber(event.operations_applied) or 0
    local pushed = tonumber(event.operations_pushed) or 0
    if applied + pushed + auto_resolved + held == 0 then
      self:_print(("[%s] up to date"):format(clock_time()))
    else
      self:_print(("[%s] synced: %s (%s ms)"):format(clock_time(), summary_text(event, auto_resolved),
        int(event.duration_ms)))
    end
    auto_resolved, held = 0, 0
  end))
  engine:on("sync_failed", self:_listener(function(event)
    if is_interrupt(event.error) then
      self._interrupted = true
      return
    end
    self:_warn(("[%s] ✗ sync failed: %s"):format(clock_time(), clean(event.error)))
  end))
  engine:on("conflict_detected", self:_listener(function(event)
    local id = event.conflict and event.conflict.story_id
    if event.auto_resolved then
      auto_resolved = auto_resolved + 1
    else
      held = held + 1
    end
    self:_print(("[%s]   conflict on '%s': %s"):format(clock_time(), tostring(id), describe_resolution(event)))
  end))

  local interval = tonumber(config.sync_interval) or SyncCommand.DEFAULT_INTERVAL
  self:_print("✓ Sync started")
  if interval < 1000 then
    self:_print("  Checking for updates every " .. int(interval) .. "ms")
  else
    self:_print("  Checking for updates every " .. int(interval / 1000) .. "s")
  end
  self:_print("  Device: " .. ctx.state:get_device_id())
  self:_print("  Server: " .. tostring(config.url) .. " (" .. tostring(config.transport or "http") .. ")")
  self:_print("")
  self:_print("Running in the foreground. Press Ctrl+C or run 'whisker sync stop' to stop.")
  if (self._stdout or io.stdout).flush then
    (self._stdout or io.stdout):flush()
  end

  local connected, connect_err = self:_connect(ctx.transport)
  if not connected then
    if tostring(connect_err):find("Authentication failed", 1, true) then
      os.remove(self:_pid_path())
      return self:_fail(connect_err)
    end
    self:_warn(("[%s] ✗ cannot connect yet: %s (will retry)"):format(clock_time(), clean(connect_err)))
  end

  local reason = "stopped"
  local max_loops = self._max_loops
  local assets = self:_assets(ctx)
  local assets_due = false
  engine:on("sync_completed", function()
    assets_due = assets ~= nil
  end)
  local ran, run_err = pcall(function()
    refresh_storage(ctx.storage)
    self:_report_assets(asset_pass(assets, "upload"), nil, ("[%s] "):format(clock_time()))
    engine:start_sync()
    local loops = 0
    while true do
      if self._interrupted then
        error("interrupted!", 0)
      end
      if file_exists(self:_stop_path()) then
        reason = "stop requested"
        return
      end
      loops = loops + 1
      if max_loops and loops > max_loops then
        return
      end
      refresh_storage(ctx.storage)
      engine:step()
      if assets_due then
        assets_due = false
        local prefix = ("[%s] "):format(clock_time())
        self:_report_assets(asset_pass(assets, "upload"), asset_pass(assets, "download"), prefix)
      end
      local out = self._stdout or io.stdout
      if out.flush then
        out:flush()
      end
      -- Short plain sleeps rather than engine:wait(): Ctrl+C makes the
      -- interpreter raise "interrupted!" at the next Lua call, and it must
      -- land here, not inside the engine's own calls, which absorb it.
      -- step() delivers WebSocket pushes, so they wait at most one slice.
      sleep(self._poll_slice or POLL_SLICE)
    end
  end)
  pcall(engine.stop_sync, engine)
  self._interrupted = false
  disconnect(ctx.transport)
  os.remove(self:_stop_path())
  os.remove(self:_pid_path())
  if not ran then
    if is_interrupt(run_err) then
      reason = "interrupted"
    else
      return self:_fail(run_err)
    end
  end
  self:_print(("✓ Sync stopped (%s)"):format(reason))
  return 0
end

--- `whisker sync stop`: asks the `whisker sync start` running on this
-- folder to stop and waits for it.
-- @return exit code (0 also when none was running; it says so)
function SyncCommand:cmd_stop()
  local pid, stale = self:_running_pid()
  if not pid then
    if stale then
      self:_print("No running sync found (removed a stale pid file)")
    else
      self:_print("No running sync found")
    end
    return 0
  end
  local file, err = io.open(self:_stop_path(), "w")
  if not file then
    return self:_fail("cannot write " .. self:_stop_path() .. ": " .. tostring(err))
  end
  file:write(int(current_pid() or 0), "\n")
  file:close()
  local deadline = monotonic() + (self._stop_timeout or SyncCommand.STOP_TIMEOUT)
  while monotonic() < deadline do
    if not process_alive(pid) or not file_exists(self:_pid_path()) then
      self:_print(("✓ Sync stopped (pid %d)"):format(pid))
      return 0
    end
    sleep(0.1)
  end
  return self:_fail(("the sync (pid %d) is still finishing a sync; it stops when that ends"):format(pid))
end

---------------------------------------------------------------------------
-- status / stats
---------------------------------------------------------------------------

local function write_json(self, value, array_fields)
  local json = json_codec()
  local text, err = json.encode(value, array_fields)
  if not text then
    return self:_fail(err)
  end
  self:_print(text)
  return 0
end

--- `whisker sync status`: state, last sync, server, device, pending
-- operations, conflicts, whether auto-sync runs, the last error. Never
-- contacts the server.
-- @param parsed parsed arguments (`json`)
-- @return exit code
function SyncCommand:cmd_status(parsed)
  parsed = parsed or {}
  local config, config_err = self:load_config()
  if not config and file_exists(self._config_path) then
    return self:_fail(config_err)
  end
  local storage, err = self:create_storage()
  if not storage then
    return self:_fail(err)
  end
  local state_mgr
  state_mgr, err = self:create_state_manager(storage)
  if not state_mgr then
    return self:_fail(err)
  end
  local state = state_mgr:load_state()
  local conflicts = type(state.conflicts) == "table" and state.conflicts or {}
  local since = state_mgr:get_time_since_last_sync()
  local last_error = state_mgr:get_last_error()
  local pid = self:_running_pid()
  local device_name = config and config.device_name or "Unknown"

  if parsed.json then
    local ids = {}
    for i, conflict in ipairs(conflicts) do
      ids[i] = conflict.story_id
    end
    return write_json(self, {
      status = state_mgr:get_sync_status(),
      last_sync_time = math.floor(tonumber(state_mgr:get_last_sync_time()) or 0),
      seconds_since_last_sync = since >= 0 and math.floor(since) or nil,
      server = config and { url = config.url, transport = config.transport or "http" } or nil,
      device = { id = state_mgr:get_device_id(), name = device_name },
      selective = config and { stories = config.only or {}, tags = config.tags or {} } or nil,
      pending_operations = state_mgr:get_pending_count(),
      unresolved_conflicts = #conflicts,
      conflicts = ids,
      auto_sync = { running = pid ~= nil, pid = pid },
      last_error = last_error,
      storage = { path = self._storage_path, kind = self._storage_kind },
    }, { "conflicts" })
  end

  self:_print("Sync Status")
  self:_print(RULE)
  self:_print("Status: " .. state_mgr:get_sync_status())
  if since < 0 then
    self:_print("Last sync: Never")
  else
    self:_print("Last sync: " .. self:format_duration(since)
      .. " (" .. os.date("%Y-%m-%d %H:%M:%S", state_mgr:get_last_sync_time()) .. ")")
  end
  if config then
    self:_print("Server: " .. tostring(config.url) .. " (" .. tostring(config.transport or "http") .. ")")
  else
    self:_print("Server: not configured (run 'whisker sync config --url <url> --key <key>')")
  end
  self:_print("Device: " .. tostring(device_name) .. " (" .. state_mgr:get_device_id() .. ")")
  if config then
    self:_print("Syncing: " .. describe_subset(config))
  end
  self:_print("Pending: " .. int(state_mgr:get_pending_count()) .. " operations")
  if #conflicts == 0 then
    self:_print("Conflicts: none")
  else
    self:_print(("Conflicts: %d unresolved (run 'whisker sync conflicts')"):format(#conflicts))
  end
  if pid then
    self:_print(("Auto-sync: running (pid %d)"):format(pid))
  else
    self:_print("Auto-sync: not running")
  end
  self:_print("Storage: " .. self._storage_path .. " (" .. tostring(self._storage_kind) .. ")")
  if last_error then
    self:_print("")
    self:_print("✗ Last error: " .. tostring(last_error.message))
    self:_print("  " .. self:format_duration(os.time() - (tonumber(last_error.timestamp) or os.time())))
  end
  return 0
end

--- `whisker sync stats`: counters as integers and bandwidth in readable units.
-- @param parsed parsed arguments (`json`)
-- @return exit code
function SyncCommand:cmd_stats(parsed)
  parsed = parsed or {}
  local storage, err = self:create_storage()
  if not storage then
    return self:_fail(err)
  end
  local state_mgr
  state_mgr, err = self:create_state_manager(storage)
  if not state_mgr then
    return self:_fail(err)
  end
  local stats = state_mgr:get_stats()
  local function n(field)
    return math.floor(tonumber(stats[field]) or 0)
  end
  if parsed.json then
    return write_json(self, {
      total_syncs = n("total_syncs"),
      last_sync_duration_ms = n("last_sync_duration_ms"),
      conflicts_resolved = n("conflicts_resolved"),
      bandwidth_sent_bytes = n("bandwidth_sent_bytes"),
      bandwidth_received_bytes = n("bandwidth_received_bytes"),
      pending_operations = state_mgr:get_pending_count(),
    })
  end
  self:_print("Sync Statistics")
  self:_print("───────────────")
  self:_print("Total syncs: " .. int(n("total_syncs")))
  if n("last_sync_duration_ms") > 0 then
    self:_print("Last sync duration: " .. int(n("last_sync_duration_ms")) .. "ms")
  end
  self:_print("Conflicts resolved: " .. int(n("conflicts_resolved")))
  self:_print("Bandwidth: ↓ " .. self:format_bytes(n("bandwidth_received_bytes"))
    .. ", ↑ " .. self:format_bytes(n("bandwidth_sent_bytes")))
  return 0
end

---------------------------------------------------------------------------
-- reset
---------------------------------------------------------------------------

--- Reads the confirmation line (the instance's `_read_line` in tests).
function SyncCommand:_read_line()
  return io.read("*l")
end

--- `whisker sync reset`: forgets what was synced (the next sync sends every
-- story again and fetches everything); stories and the device id stay.
-- Asks for confirmation unless `--yes`; refuses without a terminal.
-- @param parsed parsed arguments (`yes`)
-- @return exit code
function SyncCommand:cmd_reset(parsed)
  parsed = parsed or {}
  if not parsed.yes then
    if not self:_is_tty(0) then
      return self:_fail("reset needs confirmation and stdin is not a terminal; run 'whisker sync reset --yes'")
    end
    self:_print("Warning: This will reset all sync state.")
    self:_print("Device ID will be preserved.")
    local out = self._stdout or io.stdout
    out:write("Type 'yes' to confirm: ")
    out:flush()
    local confirm = self:_read_line()
    if confirm == nil then
      self:_print("")
    end
    if confirm == nil or confirm:gsub("%s+$", "") ~= "yes" then
      self:_print("Cancelled")
      return 0
    end
  end
  local refused = self:_refuse_if_running("resetting")
  if refused then
    return refused
  end
  local storage, err = self:create_storage()
  if not storage then
    return self:_fail(err)
  end
  local state_mgr
  state_mgr, err = self:create_state_manager(storage)
  if not state_mgr then
    return self:_fail(err)
  end
  local ok, reset_err = state_mgr:reset()
  if not ok then
    return self:_fail(reset_err or "cannot reset the sync state")
  end
  self:_print("✓ Sync state reset")
  return 0
end

---------------------------------------------------------------------------
-- conflicts
---------------------------------------------------------------------------

local function summarize(version)
  if type(version) ~= "table" then
    return "deleted"
  end
  local data = version.data
  if version.type == "delete" or (version.type ~= nil and data == nil) then
    return "deleted"
  end
  if type(data) ~= "table" then
    data = version
  end
  local title = data.title or (type(data.metadata) == "table" and data.metadata.title)
  if title ~= nil then
    return ("%q"):format(tostring(title))
  end
  return "(untitled)"
end

--- `whisker sync conflicts`: lists conflicts left for the user (strategy
-- `manual`); `conflicts resolve <story_id> --use local|remote|both` settles
-- one (the next sync pushes the result).
-- @param parsed parsed arguments (`positional`, `use`, `json`)
-- @return exit code
function SyncCommand:cmd_conflicts(parsed)
  parsed = parsed or {}
  local positional = parsed.positional or {}
  local action = positional[1] or "list"
  if action ~= "list" and action ~= "resolve" then
    return self:_fail(("unknown conflicts action '%s' (use 'list' or 'resolve')"):format(action))
  end
  if action == "list" and parsed.use then
    return self:_fail("--use applies to 'whisker sync conflicts resolve <story_id>'")
  end
  if action == "resolve" then
    if not positional[2] then
      return self:_fail("usage: whisker sync conflicts resolve <story_id> --use local|remote|both")
    end
    if not contains(SyncCommand.RESOLUTIONS, parsed.use) then
      return self:_fail(("--use must be local, remote or both, got '%s'"):format(tostring(parsed.use)))
    end
    if #positional > 2 then
      return self:_fail(("unexpected argument '%s'"):format(positional[3]))
    end
    local refused = self:_refuse_if_running("resolving conflicts")
    if refused then
      return refused
    end
  elseif #positional > 1 then
    return self:_fail(("unexpected argument '%s'"):format(positional[2]))
  end

  local config = self:load_config()
  local storage, err = self:create_storage()
  if not storage then
    return self:_fail(err)
  end
  local engine, state_mgr = self:create_sync_engine(nil, storage)
  if not engine then
    return self:_fail(state_mgr)
  end
  local conflicts = engine:get_conflicts()

  if action == "resolve" then
    local story_id = positional[2]
    local found = false
    for _, conflict in ipairs(conflicts) do
      if conflict.story_id == story_id then
        found = true
      end
    end
    if not found then
      return self:_fail(("no unresolved conflict for story '%s'"):format(story_id))
    end
    local ok, resolve_err = engine:resolve_conflict(story_id, parsed.use)
    if not ok then
      return self:_fail(resolve_err or "cannot resolve the conflict")
    end
    local kept = {
      ["local"] = "kept this device's version",
      remote = "took the server's version",
      both = "kept both versions",
    }
    self:_print(("✓ Resolved '%s': %s"):format(story_id, kept[parsed.use]))
    self:_print("  The next sync sends the result to the server ('whisker sync now').")
    return 0
  end

  if parsed.json then
    return write_json(self, { conflicts = conflicts }, { "conflicts" })
  end
  if #conflicts == 0 then
    self:_print("No unresolved conflicts")
    if not config or config.conflict_strategy ~= "manual" then
      self:_print(("  (strategy %s resolves conflicts automatically)"):format(
        tostring(config and config.conflict_strategy or "last_write_wins")))
    end
    return 0
  end
  self:_print(("Unresolved conflicts: %d"):format(#conflicts))
  self:_print(RULE)
  for _, conflict in ipairs(conflicts) do
    local age = ""
    if tonumber(conflict.detected_at) then
      age = ", detected " .. self:format_duration(os.time() - tonumber(conflict.detected_at))
    end
    self:_print(("%s (%s%s)"):format(tostring(conflict.story_id), tostring(conflict.conflict_type or "conflict"), age))
    self:_print("  local:  " .. summarize(conflict["local"]))
    self:_print("  remote: " .. summarize(conflict.remote))
  end
  self:_print("")
  self:_print("Resolve with: whisker sync conflicts resolve <story_id> --use local|remote|both")
  return 0
end

---------------------------------------------------------------------------
-- assets
---------------------------------------------------------------------------

--- `whisker sync assets`: lists the assets the stories reference and where
-- each stands here (never contacts the server); `whisker sync assets add
-- <file> [<name>]` copies a file into the assets folder and prints the
-- reference to put in a story.
-- @param parsed parsed arguments (`json`, `positional`)
-- @return exit code
function SyncCommand:cmd_assets(parsed)
  parsed = parsed or {}
  local positional = parsed.positional or {}
  local action = positional[1] or "list"
  if action ~= "list" and action ~= "add" then
    return self:_fail(("unknown assets action '%s' (use 'list' or 'add <file> [<name>]')"):format(action))
  end
  if action == "add" and (not positional[2] or #positional > 3) then
    return self:_fail("usage: whisker sync assets add <file> [<name>]")
  elseif action == "list" and #positional > 1 then
    return self:_fail(("unexpected argument '%s'"):format(positional[2]))
  end
  local Assets = try_require("whisker.sync.assets")
  if not Assets then
    return self:_fail("the assets module (whisker.sync.assets) is not available")
  end
  local storage, err = self:create_storage()
  if not storage then
    return self:_fail(err)
  end
  local config = self:load_config()
  local assets = Assets.new({
    root = self._storage_path,
    storage = storage,
    server = config and type(config.url) == "string" and http_url(config.url) or nil,
  })

  if action == "add" then
    local ref, add_err = assets:add(positional[2], positional[3])
    if not ref then
      return self:_fail(add_err)
    end
    if parsed.json then
      return write_json(self, ref)
    end
    self:_print(("✓ Added %s/%s (%s)"):format(assets:folder(), ref.name, self:format_bytes(ref.size)))
    self:_print("  Reference it from a story with:")
    self:_print("  " .. assert(json_codec().encode(ref)))
    return 0
  end

  local rows = assets:status()
  if parsed.json then
    local out = {}
    for _, row in ipairs(rows) do
      out[#out + 1] = { sha256 = row.ref.sha256, name = row.ref.name, size = row.ref.size, type = row.ref.type,
        path = row.path, present = row.present, changed = row.changed, on_server = row.on_server }
    end
    return write_json(self, { assets = out }, { "assets" })
  end
  if #rows == 0 then
    self:_print("No assets referenced by stories")
    self:_print("  (add one with 'whisker sync assets add <file>')")
    return 0
  end
  self:_print(("Assets referenced by stories: %d"):format(#rows))
  self:_print(RULE)
  for _, row in ipairs(rows) do
    local where
    if row.present then
      where = row.on_server and "here and on the server" or "here (uploaded at the next sync)"
    elseif row.changed then
      where = "changed here: differs from the reference"
    else
      where = "missing here (downloaded at the next sync)"
    end
    self:_print(("%s  %s  %s  sha256:%s  %s"):format(row.path, self:format_bytes(row.ref.size),
      tostring(row.ref.type or Assets.type_of(row.path)), row.ref.sha256:sub(1, 12), where))
  end
  return 0
end

return SyncCommand
