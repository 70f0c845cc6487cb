--- whisker-sync's own filesystem story store.
--
-- Used by `whisker sync` when whisker-core's StorageService
-- (`whisker.storage`) cannot be loaded, so the command works on a machine
-- without whisker-core. It reads and writes the same on-disk layout as
-- whisker-core's filesystem backend, so either can open a folder the other
-- wrote:
--
--     <root>/stories/<id>.json          the story, as JSON
--     <root>/metadata/<id>.meta.json    {id, title, tags, size, created_at, updated_at}
--     <root>/.index.json                {<id> = <metadata>, ...}
--
-- It offers the StorageService methods the sync engine and the state manager
-- use (`list_stories`, `load_story`, `save_story`, `delete_story`,
-- `update_metadata`, `on`/`emit` with the same events, and a `backend` with
-- `load`/`save`/`delete`/`exists`). Sync bookkeeping records (ids starting
-- with `_whisker_sync_`) are stored as `stories/<id>.json` through `backend`
-- only and never appear in the index or in `list_stories`. Story ids that
-- could escape the folder (path separators, `..`, control characters) are
-- refused. Every file is written to a temporary file first and then renamed
-- over the old one, so a crash leaves either the old or the new content.
--
-- JSON goes through whisker-sync's native module (no cjson needed).
-- @module whisker.sync.file_store

local files = require("whisker.sync.files")

local FileStore = {}
FileStore.__index = FileStore

--- Events emitted, as whisker-core's StorageService names them.
FileStore.Events = {
  STORY_SAVED = "story_saved",
  STORY_LOADED = "story_loaded",
  STORY_DELETED = "story_deleted",
  STORY_CREATED = "story_created",
  STORY_UPDATED = "story_updated",
  METADATA_UPDATED = "metadata_updated",
  STORAGE_CLEARED = "storage_cleared",
  STORAGE_ERROR = "storage_error",
}

--- Prefix of the sync engine's own records.
FileStore.RESERVED_PREFIX = "_whisker_sync_"

--- Longest accepted id, in bytes (file names must stay under 255 bytes).
FileStore.MAX_ID_BYTES = 200

local json_codec

--- The JSON functions of the native module.
local function json()
  if not json_codec then
    json_codec = require("whisker.storage.sync.native").json
  end
  return json_codec
end

local function encode(value)
  return json().encode(value)
end

local function decode(text)
  return json().decode(text, "empty file")
end

local function is_reserved(id)
  return id:sub(1, #FileStore.RESERVED_PREFIX) == FileStore.RESERVED_PREFIX
end

--- Checks that an id can be used as a file name inside the store.
-- @param id the story id
-- @return true, or nil and a message
function FileStore.check_id(id)
  if type(id) ~= "string" or id == "" then
    return nil, "story id must be a non-empty string"
  end
  if #id > FileStore.MAX_ID_BYTES then
    return nil, ("story id is longer than %d bytes"):format(FileStore.MAX_ID_BYTES)
  end
  if id:find("[/\\]") then
    return nil, ("unsafe story id %q: contains a path separator"):format(id)
  end
  if id:find("%.%.") or id == "." then
    return nil, ("unsafe story id %q: contains '..'"):format(id)
  end
  if id:find("[%z\1-\31\127]") then
    return nil, ("unsafe story id %q: contains a control character"):format(id)
  end
  return true
end

local read_file, exists = files.read, files.exists

local temp_counter = 0

--- Writes `content` to `path` through a temporary file in the same folder,
-- renamed over `path` once complete.
-- @return true, or false and a message
local function atomic_write(path, content)
  temp_counter = temp_counter + 1
  local unique = tostring({}):match("0x(%x+)") or tostring(os.time())
  local temp = ("%s.%s-%d.tmp"):format(path, unique, temp_counter)
  local file, err = io.open(temp, "wb")
  if not file then
    return false, "cannot write " .. path .. ": " .. tostring(err)
  end
  local ok, write_err = file:write(content)
  local closed, close_err = file:close()
  if not ok or not closed then
    os.remove(temp)
    return false, "cannot write " .. path .. ": " .. tostring(write_err or close_err)
  end
  local renamed, rename_err = os.rename(temp, path)
  if not renamed then
    os.remove(temp)
    return false, "cannot replace " .. path .. ": " .. tostring(rename_err)
  end
  return true
end

local shell_quote = files.shell_quote

local function is_dir(path)
  local ok, lfs = pcall(require, "lfs")
  if ok and type(lfs) == "table" and lfs.attributes then
    return lfs.attributes(path, "mode") == "directory"
  end
  local probe = io.open(path .. "/.", "rb")
  if probe then
    probe:close()
    return true
  end
  return false
end

--- Creates a directory (and its parents) unless it exists.
local function ensure_dir(path)
  if is_dir(path) then
    return true
  end
  local ok, lfs = pcall(require, "lfs")
  if ok and type(lfs) == "table" and lfs.mkdir then
    local parent = path:match("^(.+)/[^/]+$")
    if parent and not is_dir(parent) then
      local made, err = ensure_dir(parent)
      if not made then
        return nil, err
      end
    end
    lfs.mkdir(path)
  else
    os.execute("mkdir -p " .. shell_quote(path) .. " 2>/dev/null")
  end
  if is_dir(path) then
    return true
  end
  return nil, "cannot create directory " .. path
end

--- Creates a store rooted at `options.path` (default `.whisker-storage`).
-- Nothing is touched on disk until `initialize()`.
-- @param options table: `path` (root folder), `enable_events` (default true)
-- @return FileStore
function FileStore.new(options)
  options = options or {}
  local self = setmetatable({}, FileStore)
  self.root = options.path or ".whisker-storage"
  self.stories_dir = self.root .. "/stories"
  self.metadata_dir = self.root .. "/metadata"
  self.index_file = self.root .. "/.index.json"
  self.index = {}
  self.enable_events = options.enable_events ~= false
  self.event_listeners = {}
  self.backend = FileStore._backend(self)
  return self
end

--- Creates the folders and loads the index (creating an empty one).
-- @return true, or false and a message
function FileStore:initialize()
  for _, dir in ipairs({ self.root, self.stories_dir, self.metadata_dir }) do
    local ok, err = ensure_dir(dir)
    if not ok then
      return false, err
    end
  end
  local text = read_file(self.index_file)
  if not text then
    self.index = {}
    return self:_save_index()
  end
  local index, err = decode(text)
  if type(index) ~= "table" then
    return false, ("cannot read %s: %s"):format(self.index_file, tostring(err or "not a JSON object"))
  end
  self.index = index
  self._index_text = text
  return true
end

function FileStore:_save_index()
  local text, err = encode(self.index)
  if not text then
    return false, err
  end
  local ok, write_err = atomic_write(self.index_file, text)
  if ok then
    self._index_text = text
  end
  return ok, write_err
end

--- Picks up changes another process (an editor, another `whisker sync`)
-- made to the index since this store last read or wrote it. Called before
-- listing and before every change; cheap when nothing changed.
function FileStore:refresh()
  local text = read_file(self.index_file)
  if text and text ~= self._index_text then
    local index = decode(text)
    if type(index) == "table" then
      self.index = index
      self._index_text = text
    end
  end
end

function FileStore:_story_path(id)
  return ("%s/%s.json"):format(self.stories_dir, id)
end

function FileStore:_metadata_path(id)
  return ("%s/%s.meta.json"):format(self.metadata_dir, id)
end

--- Registers an event listener.
-- @param event one of `FileStore.Events`
-- @param callback function(data)
function FileStore:on(event, callback)
  if not self.enable_events then
    return
  end
  local listeners = self.event_listeners[event]
  if not listeners then
    listeners = {}
    self.event_listeners[event] = listeners
  end
  listeners[#listeners + 1] = callback
end

--- Calls an event's listeners; a failing listener is reported on stderr.
-- @param event event name
-- @param data event payload
function FileStore:emit(event, data)
  if not self.enable_events then
    return
  end
  local listeners = self.event_listeners[event]
  if not listeners then
    return
  end
  for _, callback in ipairs(listeners) do
    local ok, err = pcall(callback, data)
    if not ok then
      io.stderr:write(("whisker-sync: error in storage '%s' listener: %s\n"):format(event, tostring(err)))
    end
  end
end

function FileStore:_fail(operation, id, message)
  self:emit(FileStore.Events.STORAGE_ERROR, { operation = operation, key = id, error = message })
  return false, message
end

--- Writes a story and its metadata; no events.
function FileStore:_write_story(id, data, metadata)
  local text, err = encode(data)
  if not text then
    return false, err
  end
  local ok, write_err = atomic_write(self:_story_path(id), text)
  if not ok then
    return false, write_err
  end
  local now = os.time()
  local previous = self.index[id]
  local tags = (metadata and metadata.tags) or (previous and previous.tags) or {}
  local title = (type(data.metadata) == "table" and data.metadata.title) or data.title or "Untitled"
  local meta = {
    id = id,
    title = title,
    tags = tags,
    size = #text,
    created_at = previous and previous.created_at or now,
    updated_at = now,
  }
  local meta_text, meta_err = encode(meta)
  if not meta_text then
    return false, meta_err
  end
  ok, write_err = atomic_write(self:_metadata_path(id), meta_text)
  if not ok then
    return false, write_err
  end
  self.index[id] = meta
  return self:_save_index()
end

--- Saves a story.
-- @param id story id
-- @param data story table
-- @param options optional `{metadata = {tags = {...}}}`
-- @return true, or false and a message
function FileStore:save_story(id, data, options)
  local ok, err = FileStore.check_id(id)
  if not ok then
    return self:_fail("save", id, err)
  end
  if is_reserved(id) then
    return self:_fail("save", id, ("story id %q is reserved for sync state"):format(id))
  end
  if type(data) ~= "table" then
    return self:_fail("save", id, "story data must be a table")
  end
  self:refresh()
  local is_new = self.index[id] == nil
  ok, err = self:_write_story(id, data, options and options.metadata)
  if not ok then
    return self:_fail("save", id, err)
  end
  self:emit(FileStore.Events.STORY_SAVED, { id = id, data = data, is_new = is_new })
  if is_new then
    self:emit(FileStore.Events.STORY_CREATED, { id = id })
  else
    self:emit(FileStore.Events.STORY_UPDATED, { id = id })
  end
  return true
end

--- Loads a story.
-- @param id story id
-- @return the story table, or nil and a message (`"Story not found"`)
function FileStore:load_story(id)
  local ok, err = FileStore.check_id(id)
  if not ok then
    return nil, err
  end
  if is_reserved(id) then
    return nil, "Story not found"
  end
  if not self.index[id] then
    self:refresh()
    if not self.index[id] then
      return nil, "Story not found"
    end
  end
  local text = read_file(self:_story_path(id))
  if not text then
    return nil, "Story not found"
  end
  local data, decode_err = decode(text)
  if type(data) ~= "table" then
    return nil, ("cannot read story %q: %s"):format(id, tostring(decode_err))
  end
  self:emit(FileStore.Events.STORY_LOADED, { id = id, from_cache = false })
  return data
end

--- Deletes a story.
-- @param id story id
-- @return true, or false and a message (`"Story not found"`)
function FileStore:delete_story(id)
  local ok, err = FileStore.check_id(id)
  if not ok then
    return self:_fail("delete", id, err)
  end
  self:refresh()
  if is_reserved(id) or not self.index[id] then
    return self:_fail("delete", id, "Story not found")
  end
  self.index[id] = nil
  ok, err = self:_save_index()
  if not ok then
    return self:_fail("delete", id, err)
  end
  os.remove(self:_story_path(id))
  os.remove(self:_metadata_path(id))
  self:emit(FileStore.Events.STORY_DELETED, { id = id })
  return true
end

--- Lists stories (never the sync records), newest first.
-- @param filter optional `{tags, limit, offset}`
-- @return array of `{id, title, tags, size, created_at, updated_at}`
function FileStore:list_stories(filter)
  filter = filter or {}
  self:refresh()
  local results = {}
  for id, meta in pairs(self.index) do
    if type(id) == "string" and not is_reserved(id) and type(meta) == "table" then
      local keep = true
      if type(filter.tags) == "table" and #filter.tags > 0 then
        keep = false
        for _, wanted in ipairs(filter.tags) do
          for _, tag in ipairs(type(meta.tags) == "table" and meta.tags or {}) do
            if tag == wanted then
              keep = true
            end
          end
        end
      end
      if keep then
        local entry = {}
        for k, v in pairs(meta) do
          entry[k] = v
        end
        entry.id = id
        results[#results + 1] = entry
      end
    end
  end
  table.sort(results, function(a, b)
    local ta, tb = tonumber(a.updated_at) or 0, tonumber(b.updated_at) or 0
    if ta ~= tb then
      return ta > tb
    end
    return a.id < b.id
  end)
  if filter.limit or filter.offset then
    local offset = filter.offset or 0
    local limit = filter.limit or #results
    local page = {}
    for i = offset + 1, math.min(offset + limit, #results) do
      page[#page + 1] = results[i]
    end
    results = page
  end
  return results
end

--- Whether a story exists.
-- @param id story id
-- @return boolean
function FileStore:has_story(id)
  return type(id) == "string" and not is_reserved(id) and self.index[id] ~= nil
end

--- A story's metadata.
-- @param id story id
-- @return metadata table, or nil and `"Story not found"`
function FileStore:get_metadata(id)
  if not self:has_story(id) then
    return nil, "Story not found"
  end
  return self.index[id]
end

--- Updates a story's title and/or tags.
-- @param id story id
-- @param metadata `{title?, tags?}`
-- @return true, or false and a message
function FileStore:update_metadata(id, metadata)
  self:refresh()
  if not self:has_story(id) then
    return false, "Story not found"
  end
  local meta = self.index[id]
  if type(metadata) == "table" then
    if metadata.title ~= nil then
      meta.title = metadata.title
    end
    if metadata.tags ~= nil then
      meta.tags = metadata.tags
    end
  end
  meta.updated_at = os.time()
  local text, err = encode(meta)
  if not text then
    return false, err
  end
  local ok, write_err = atomic_write(self:_metadata_path(id), text)
  if not ok then
    return false, write_err
  end
  ok, write_err = self:_save_index()
  if not ok then
    return false, write_err
  end
  self:emit(FileStore.Events.METADATA_UPDATED, { id = id, metadata = metadata })
  return true
end

--- Deletes every story (sync records stay).
-- @return true, or false and a message
function FileStore:clear()
  self:refresh()
  local ids = {}
  for id in pairs(self.index) do
    ids[#ids + 1] = id
  end
  self.index = {}
  local ok, err = self:_save_index()
  if not ok then
    return false, err
  end
  for _, id in ipairs(ids) do
    if FileStore.check_id(id) then
      os.remove(self:_story_path(id))
      os.remove(self:_metadata_path(id))
    end
  end
  self:emit(FileStore.Events.STORAGE_CLEARED, {})
  return true
end

--- The backend view used by the sync state manager: `load`, `save`,
-- `delete`, `exists`, `list`. Sync records are plain files; other keys are
-- stories (saved without events).
-- @param store the FileStore
-- @return backend table
function FileStore._backend(store)
  local backend = {}

  function backend.load(_, key)
    local ok, err = FileStore.check_id(key)
    if not ok then
      return nil, err
    end
    if not is_reserved(key) then
      return store:load_story(key)
    end
    local text = read_file(store:_story_path(key))
    if not text then
      return nil, "Story not found"
    end
    local value, decode_err = decode(text)
    if type(value) ~= "table" then
      return nil, ("cannot read %s: %s"):format(key, tostring(decode_err or "not a JSON object"))
    end
    return value
  end

  function backend.save(_, key, data, metadata)
    local ok, err = FileStore.check_id(key)
    if not ok then
      return false, err
    end
    if type(data) ~= "table" then
      return false, "Data must be a table"
    end
    if not is_reserved(key) then
      return store:_write_story(key, data, metadata)
    end
    local text, encode_err = encode(data)
    if not text then
      return false, encode_err
    end
    return atomic_write(store:_story_path(key), text)
  end

  function backend.delete(_, key)
    local ok, err = FileStore.check_id(key)
    if not ok then
      return false, err
    end
    if not is_reserved(key) then
      return store:delete_story(key)
    end
    os.remove(store:_story_path(key))
    return true
  end

  function backend.exists(_, key)
    if not FileStore.check_id(key) then
      return false
    end
    if is_reserved(key) then
      return exists(store:_story_path(key))
    end
    return store.index[key] ~= nil
  end

  function backend.list(_, filter)
    return store:list_stories(filter)
  end

  return backend
end

return FileStore
