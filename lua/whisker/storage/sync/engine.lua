--- Sync engine: keeps a device's stories in sync with the server.
--
-- Implemented natively in whisker-sync. Each sync finds the stories changed
-- since the last one (storage events when the storage emits them, content
-- hashes otherwise), queues them durably before any network call, pulls the
-- server's changes, settles conflicts by the chosen strategy, applies the
-- winners and pushes the rest. Only changes travel; deletes travel as
-- tombstones.
--
-- Works with whisker-core's StorageService (`list_stories`, `load_story`,
-- `save_story`, `delete_story`, events) and with storages offering `list`,
-- `load`, `save`, `delete`. Events: `sync_started`, `sync_stopped`,
-- `sync_progress`, `conflict_detected`, `sync_completed`, `sync_failed`.
-- @module whisker.storage.sync.engine

local native = require("whisker.storage.sync.native").engine

local unpack = table.unpack or unpack

local function pack(...)
  return { n = select("#", ...), ... }
end

--- Wraps a native method so that an interrupt (Ctrl-C: the interpreter
-- raises "interrupted!" in whatever Lua code runs, such as a callback during
-- a sync) reaches the caller as the plain "interrupted!" error.
local function interruptible(fn)
  return function(...)
    local results = pack(pcall(fn, ...))
    if results[1] then
      return unpack(results, 2, results.n)
    end
    if tostring(results[2]):find("interrupted!", 1, true) then
      error("interrupted!", 0)
    end
    error(results[2], 0)
  end
end

local SyncEngine = {}
SyncEngine.__index = SyncEngine

--- Engine status values: `IDLE`, `SYNCING`, `ERROR`.
SyncEngine.Status = {
  IDLE = "idle",
  SYNCING = "syncing",
  ERROR = "error",
}

--- Creates a sync engine.
-- @param config table:
--   `storage` (StorageService or a storage with list/load/save/delete),
--   `transport` (HTTP or WebSocket transport; without one, changes are only queued),
--   `state_manager` (a SyncStateManager; by default one is opened on
--   `storage.backend` when it has one, else state lives in memory),
--   `device_id` (default: the state manager's, a UUID),
--   `sync_interval` (milliseconds, default 60000),
--   `conflict_strategy` (`last_write_wins` (default), `auto_merge`,
--   `keep_both`, `manual`),
--   `selective` (`{stories = {patterns…}, tags = {tags…}}`: sync only the
--   stories whose id matches a pattern (`*`, `?` wildcards) or that carry
--   one of the tags; changing it fetches what it newly includes),
--   `conflict_resolver` or `on_conflict` (function(conflict) for the manual
--   strategy; returns `{winner = "local"|"remote"|"both"}`, `{winner = ..., data = story}`,
--   or the story itself; `nil` leaves the conflict for `resolve_conflict`).
-- @return SyncEngine
function SyncEngine.new(config)
  config = config or {}
  local self = setmetatable({}, SyncEngine)
  self._config = config
  self._storage = config.storage
  self._transport = config.transport
  self._sync_interval = config.sync_interval or 60000
  self._conflict_resolver = config.conflict_resolver or config.on_conflict
  self._status = SyncEngine.Status.IDLE
  self._running = false
  self._sync_timer = nil
  self._last_sync_time = 0
  self._sync_version = 0
  self._listeners = {}
  local handle, device_id_or_err, strategy = native.new(self, config)
  if not handle then
    error(device_id_or_err, 2)
  end
  self._native = handle
  self._device_id = device_id_or_err
  self._conflict_strategy = strategy
  return self
end

--- Starts automatic syncing: syncs now, then every `sync_interval`
-- milliseconds and whenever the server pushes a change (WebSocket). Returns
-- promptly; call `step()` from your event loop, or `wait()` between steps.
-- @function start_sync
SyncEngine.start_sync = interruptible(native.start_sync)

--- Stops automatic syncing.
-- @function stop_sync
SyncEngine.stop_sync = interruptible(native.stop_sync)

--- Syncs once, now.
-- @return true, or false and a message
-- @function sync_now
SyncEngine.sync_now = interruptible(native.sync_now)

--- Runs a sync if one is due (interval elapsed or remote change pushed).
-- @return true and the sync's result when it synced, false otherwise
-- @function step
SyncEngine.step = interruptible(native.step)

--- Sleeps until the next sync is due, a remote change arrives, or `seconds`
-- (default 1) pass.
-- @function wait
SyncEngine.wait = interruptible(native.wait)

--- Conflicts left for the user (manual strategy without a resolver).
-- @return array of `{story_id, conflict_type, local, remote, detected_at}`
-- @function get_conflicts
SyncEngine.get_conflicts = native.get_conflicts

--- Resolves a conflict left for the user; the next sync pushes the result.
-- @param story_id the story in conflict
-- @param choice `"local"`, `"remote"`, `"both"` or `"merged"`
-- @param data the story to keep, with `"merged"` (nil deletes it)
-- @return true, or nil and a message
-- @function resolve_conflict
SyncEngine.resolve_conflict = interruptible(native.resolve_conflict)

--- Settles conflict tables (`{story_id, local_version, remote_version}`) by
-- the engine's strategy or resolver and writes the results to storage.
-- @function _resolve_conflicts
SyncEngine._resolve_conflicts = interruptible(native.resolve_conflicts)

--- The engine's status: one of `SyncEngine.Status`.
function SyncEngine:get_sync_status()
  return self._status
end

--- When the last sync with the server completed (Unix seconds, 0 if never).
function SyncEngine:get_last_sync_time()
  return self._last_sync_time
end

--- Adds a listener for an event.
function SyncEngine:on(event, callback)
  local listeners = self._listeners[event]
  if not listeners then
    listeners = {}
    self._listeners[event] = listeners
  end
  listeners[#listeners + 1] = callback
end

--- Removes the first listener identical to `callback`.
function SyncEngine:off(event, callback)
  local listeners = self._listeners[event]
  if not listeners then
    return
  end
  for i, cb in ipairs(listeners) do
    if cb == callback then
      table.remove(listeners, i)
      return
    end
  end
end

--- Calls the listeners of an event; a failing listener is reported on
-- stderr and does not stop the others or the sync.
function SyncEngine:_emit(event, data)
  local listeners = self._listeners[event]
  if not listeners then
    return
  end
  -- A listener may remove itself: call the ones present when the event fired.
  local snapshot = {}
  for i, callback in ipairs(listeners) do
    snapshot[i] = callback
  end
  for _, callback in ipairs(snapshot) do
    local ok, err = pcall(callback, data)
    if not ok and tostring(err):find("interrupted!", 1, true) then
      error(err, 0)
    elseif not ok then
      io.stderr:write(("whisker-sync: error in '%s' listener: %s\n"):format(event, tostring(err)))
    end
  end
end

return SyncEngine
