--- Sync state manager: device id, last sync time, version vector, the queue
-- of operations waiting to be pushed, statistics and the last error.
--
-- Implemented natively in whisker-sync. State is persisted through
-- `storage_service.backend:load(key)` / `:save(key, table, {})` (and
-- `:delete(key)` when the backend has it) under `_whisker_sync_state` and,
-- for the queue, `_whisker_sync_queue_<n>` records, so queueing one more
-- operation writes only that operation. Every method that changes state has
-- saved it when it returns; those return `true`, or `false, message` when the
-- backend refused the write.
-- @module whisker.storage.sync.state_manager

local native = require("whisker.storage.sync.native").state_manager

local SyncStateManager = {}
SyncStateManager.__index = SyncStateManager

--- Sync status values: `IDLE`, `SYNCING`, `ERROR`.
SyncStateManager.Status = {
  IDLE = "idle",
  SYNCING = "syncing",
  ERROR = "error",
}

--- Creates a state manager on a StorageService (anything with a `backend`
-- offering `load` and `save`). Loads the saved state, or creates one with a
-- new device id (UUID v4 from OS randomness) and saves it before returning.
-- A stored value that is not a sync state is reported on stderr and in
-- `get_last_error()`, and replaced with defaults; stories are never touched.
-- @param storage_service StorageService or a table with `backend`
-- @return SyncStateManager
function SyncStateManager.new(storage_service)
  local handle, err = native.open(storage_service)
  if not handle then
    error(err, 2)
  end
  local self = setmetatable({}, SyncStateManager)
  self._storage = storage_service
  self._state_key = native.state_key
  self._native = handle
  return self
end

--- The whole state (a copy), with the queue as `pending_operations`.
-- @return table
function SyncStateManager:load_state()
  return self._native:load_state()
end

--- Replaces the whole state with a copy of `state`; its `pending_operations`
-- become the queue, and the device id is kept if `state` has none.
-- @param state table shaped like `load_state()`'s result
-- @return true, or false and a message
function SyncStateManager:save_state(state)
  return self._native:save_state(state)
end

--- This device's id.
-- @return string UUID
function SyncStateManager:get_device_id()
  return self._native:get_device_id()
end

--- Records when the last sync completed.
-- @param timestamp Unix seconds
-- @return true, or false and a message
function SyncStateManager:update_last_sync_time(timestamp)
  return self._native:update_last_sync_time(timestamp)
end

--- When the last sync completed.
-- @return Unix seconds, 0 if never
function SyncStateManager:get_last_sync_time()
  return self._native:get_last_sync_time()
end

--- Sets one device's version in the version vector.
-- @param device_id device id
-- @param version version number
-- @return true, or false and a message
function SyncStateManager:update_version_vector(device_id, version)
  return self._native:update_version_vector(device_id, version)
end

--- Sets several devices' versions at once.
-- @param version_vector map of device id to version
-- @return true, or false and a message
function SyncStateManager:update_version_vector_batch(version_vector)
  return self._native:update_version_vector_batch(version_vector)
end

--- The version vector (a copy).
-- @return map of device id to version
function SyncStateManager:get_version_vector()
  return self._native:get_version_vector()
end

--- One device's version.
-- @param device_id device id
-- @return version, 0 when unknown
function SyncStateManager:get_device_version(device_id)
  return self._native:get_device_version(device_id)
end

--- Sets the sync status.
-- @param status one of `SyncStateManager.Status`
-- @return true, or false and a message
function SyncStateManager:set_sync_status(status)
  return self._native:set_sync_status(status)
end

--- The sync status.
-- @return string
function SyncStateManager:get_sync_status()
  return self._native:get_sync_status()
end

--- Adds an operation (any table) to the end of the queue.
-- @param operation table
-- @return true, or false and a message
function SyncStateManager:queue_operation(operation)
  return self._native:queue_operation(operation)
end

--- Adds several operations to the end of the queue.
-- @param operations array of tables
-- @return true, or false and a message
function SyncStateManager:queue_operations_batch(operations)
  return self._native:queue_operations_batch(operations)
end

--- The queued operations, oldest first (copies).
-- @return array
function SyncStateManager:get_pending_operations()
  return self._native:get_pending_operations()
end

--- Removes the queued operation at a position.
-- @param index position, from 1
-- @return true; false when out of range (nothing written), or false and a message
function SyncStateManager:remove_pending_operation(index)
  return self._native:remove_pending_operation(index)
end

--- Removes the first queued operation with the same `type`, `story_id` and `timestamp`.
-- @param operation table
-- @return true; false when none matches, or false and a message
function SyncStateManager:remove_pending_operation_by_match(operation)
  return self._native:remove_pending_operation_by_match(operation)
end

--- Empties the queue.
-- @return true, or false and a message
function SyncStateManager:clear_pending_operations()
  return self._native:clear_pending_operations()
end

--- Number of queued operations.
-- @return integer
function SyncStateManager:get_pending_count()
  return self._native:get_pending_count()
end

--- Counts a completed sync.
-- @param duration_ms how long it took, in milliseconds
-- @param operations_count operations exchanged (not stored)
-- @param conflicts_count conflicts resolved (added up)
-- @return true, or false and a message
function SyncStateManager:record_sync(duration_ms, operations_count, conflicts_count)
  return self._native:record_sync(duration_ms, operations_count, conflicts_count)
end

--- Adds to the bandwidth counters.
-- @param sent_bytes bytes sent (nil = 0)
-- @param received_bytes bytes received (nil = 0)
-- @return true, or false and a message
function SyncStateManager:record_bandwidth(sent_bytes, received_bytes)
  return self._native:record_bandwidth(sent_bytes, received_bytes)
end

--- Statistics: `total_syncs`, `last_sync_duration_ms`, `conflicts_resolved`,
-- `bandwidth_sent_bytes`, `bandwidth_received_bytes` (integers).
-- @return table
function SyncStateManager:get_stats()
  return self._native:get_stats()
end

--- Zeroes the statistics.
-- @return true, or false and a message
function SyncStateManager:reset_stats()
  return self._native:reset_stats()
end

--- Records an error and sets the status to `error`.
-- @param error_message string
-- @return true, or false and a message
function SyncStateManager:record_error(error_message)
  return self._native:record_error(error_message)
end

--- Clears the last error; status `error` becomes `idle`.
-- @return true, or false and a message
function SyncStateManager:clear_error()
  return self._native:clear_error()
end

--- The last error.
-- @return `{message, timestamp}` or nil
function SyncStateManager:get_last_error()
  return self._native:get_last_error()
end

--- Returns everything to defaults except the device id, and empties the queue.
-- @return true, or false and a message
function SyncStateManager:reset()
  return self._native:reset()
end

--- The whole state (a copy), as `load_state()`.
-- @return table
function SyncStateManager:get_full_state()
  return self._native:load_state()
end

--- Whether the status is `syncing`.
-- @return boolean
function SyncStateManager:is_syncing()
  return self._native:get_sync_status() == SyncStateManager.Status.SYNCING
end

--- Whether the status is `error`.
-- @return boolean
function SyncStateManager:has_error()
  return self._native:get_sync_status() == SyncStateManager.Status.ERROR
end

--- Seconds since the last completed sync.
-- @return seconds, or -1 if never synced
function SyncStateManager:get_time_since_last_sync()
  return self._native:get_time_since_last_sync()
end

return SyncStateManager
