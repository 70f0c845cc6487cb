--- Storage sync protocol: operations, conflict detection and resolution,
-- state deltas and version vectors.
--
-- Implemented natively in whisker-sync; operations and story data stay the
-- caller's Lua tables. Functions raise on misuse, as they always did.
-- @module whisker.storage.sync.protocol

local native = require("whisker.storage.sync.native").protocol

local Protocol = {}

local function copy(constants)
  local out = {}
  for k, v in pairs(constants) do
    out[k] = v
  end
  return out
end

--- Operation types: `CREATE`, `UPDATE`, `DELETE`, `METADATA_UPDATE`.
Protocol.OperationType = copy(native.OperationType)

--- Conflict strategies: `LAST_WRITE_WINS`, `MANUAL`, `AUTO_MERGE`, `KEEP_BOTH`.
Protocol.ConflictStrategy = copy(native.ConflictStrategy)

--- Wraps a native function that answers `nil, message` on bad input so that
-- it raises the message at the caller instead.
local function raising(fn)
  return function(...)
    local result, err = fn(...)
    if result == nil and err ~= nil then
      error(err, 2)
    end
    return result
  end
end

--- Creates an operation with a fresh id, stamped now (Unix seconds).
-- @param op_type one of `Protocol.OperationType`
-- @param story_id story the operation changes
-- @param data story data (nil for a delete)
-- @param metadata optional table; `metadata.device_id` becomes the operation's device
-- @return operation table `{id, type, story_id, data, metadata, timestamp, device_id}`
-- @function create_operation
Protocol.create_operation = raising(native.create_operation)

--- Finds stories changed on both sides whose latest changes are concurrent.
-- Changes are concurrent unless one was based on a server version that
-- included the other (`base_version` ≥ `version`), or both are deletes.
-- @param local_ops array of local operations
-- @param remote_ops array of remote operations
-- @return array of conflicts `{story_id, local_operations, remote_operations,
--   local_version, remote_version, conflict_type}`, in local order
-- @function detect_conflicts
Protocol.detect_conflicts = raising(native.detect_conflicts)

--- Resolves a conflict with a strategy.
-- Last-write-wins orders operations by timestamp, then device id, then
-- operation id, so every replica picks the same winner. Auto-merge merges
-- field by field (same-field edits take the last-write-wins side's value).
-- Keep-both returns two renamed copies. Manual returns `resolver_fn(conflict)`.
-- @param conflict conflict table (needs `story_id`, `local_version`, `remote_version`)
-- @param strategy one of `Protocol.ConflictStrategy`
-- @param resolver_fn function(conflict) for the manual strategy
-- @return resolution table
function Protocol.resolve_conflict(conflict, strategy, resolver_fn)
  if strategy == Protocol.ConflictStrategy.MANUAL then
    if not resolver_fn then
      error("Manual strategy requires resolver_fn", 2)
    end
    return resolver_fn(conflict)
  end
  local resolution, err = native.resolve_conflict(conflict, strategy)
  if resolution == nil then
    error(err, 2)
  end
  return resolution
end

--- Operations that turn one state (story id → story) into another, in story-id order.
-- @param old_state map of story id to story data
-- @param new_state map of story id to story data
-- @return array of create, update and delete operations
-- @function generate_delta
Protocol.generate_delta = raising(native.generate_delta)

--- Applies operations to a state, returning a new state; the inputs are not modified.
-- @param current_state map of story id to story data
-- @param delta_ops array of operations
-- @return new state map
-- @function apply_delta
Protocol.apply_delta = raising(native.apply_delta)

--- Creates an empty version vector (device id → version; absent means 0).
-- @function create_version_vector
Protocol.create_version_vector = native.create_version_vector

--- Sets one device's version in a vector.
-- @return the same vector
-- @function update_version_vector
Protocol.update_version_vector = native.update_version_vector

--- Compares two version vectors.
-- @return `"equal"`, `"before"`, `"after"` or `"concurrent"`
-- @function compare_version_vectors
Protocol.compare_version_vectors = raising(native.compare_version_vectors)

--- Merges two version vectors into a new one (entry-wise maximum).
-- @function merge_version_vectors
Protocol.merge_version_vectors = raising(native.merge_version_vectors)

return Protocol
