--- An in-memory story storage with whisker-core StorageService's method
-- names and a `backend` for the engine's sync state.
-- @module support.story_service

local M = {}

--- A new, empty storage. Stories are kept as given in `stories` (id → story)
-- and sync records in `backend_data` (key → value), both open to the spec.
-- It has no events and no timestamps: the engine must find changes by
-- itself, so a spec may also edit `stories` directly, as another program
-- writing the same files would.
function M.new()
  local service = { stories = {}, backend_data = {} }
  function service:list_stories()
    local out = {}
    for id in pairs(self.stories) do
      out[#out + 1] = { id = id }
    end
    return out
  end
  function service:load_story(id)
    return self.stories[id]
  end
  function service:save_story(id, data)
    self.stories[id] = data
    return true
  end
  function service:delete_story(id)
    self.stories[id] = nil
    return true
  end
  service.backend = {
    load = function(_, key) return service.backend_data[key] end,
    save = function(_, key, data) service.backend_data[key] = data; return true end,
    delete = function(_, key) service.backend_data[key] = nil; return true end,
  }
  return service
end

return M
