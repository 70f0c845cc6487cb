--- Large assets next to the stories: which assets the stories reference,
-- uploading the ones this device has before a sync pushes, downloading the
-- missing ones after it pulls.
--
-- A story refers to an asset with a table anywhere in its data:
--
--     {asset = "sha256:<64 hex digits>", name = "cave.png", size = 48213, type = "image/png"}
--
-- The story itself carries only that reference (the engine syncs it like
-- any other field); the bytes travel through the server's blob API
-- (`transport:put_asset` / `transport:get_asset`), in chunks, resumable,
-- stored once per content. On a device the file lives at
-- `<storage>/assets/<name>` (`<storage>/assets/<sha256>` when the reference
-- has no usable name); `name` may contain `/` for subfolders but no `..`,
-- backslashes, control characters or segments starting with a dot.
--
-- What this device knows is kept in the record `_whisker_sync_assets`
-- (through `storage.backend`, like the sync state): the assets known to be
-- on the server (for the server URL it was made for), and the hashes of
-- local files with the size and modification time they were hashed at, so
-- unchanged files are not read again.
-- @module whisker.sync.assets

local Assets = {}
Assets.__index = Assets

--- Folder of the asset files, inside the storage folder.
Assets.FOLDER = "assets"

--- Record key of what this device knows about assets.
Assets.RECORD_KEY = "_whisker_sync_assets"

--- How deep a story's data is searched for references.
Assets.MAX_DEPTH = 64

--- Longest asset name, in bytes.
Assets.MAX_NAME_BYTES = 200

local TYPES = {
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", svg = "image/svg+xml", avif = "image/avif",
  mp3 = "audio/mpeg", ogg = "audio/ogg", oga = "audio/ogg", wav = "audio/wav",
  flac = "audio/flac", m4a = "audio/mp4", mp4 = "video/mp4", webm = "video/webm",
  json = "application/json", txt = "text/plain", md = "text/markdown",
  css = "text/css", js = "text/javascript", html = "text/html",
  woff = "font/woff", woff2 = "font/woff2", ttf = "font/ttf", otf = "font/otf",
  pdf = "application/pdf", zip = "application/zip",
}

local blob_module

--- The asset helpers of the native module.
local function blob()
  if not blob_module then
    blob_module = require("whisker.storage.sync.native").blob
  end
  return blob_module
end

--- The MIME type for a file name, from its extension.
-- @param name file name
-- @return MIME type (`application/octet-stream` when unknown)
function Assets.type_of(name)
  local ext = tostring(name or ""):match("%.([%w]+)$")
  return ext and TYPES[ext:lower()] or "application/octet-stream"
end

--- Checks that an asset name is a safe relative path.
-- @param name the name
-- @return true, or nil and a message
function Assets.check_name(name)
  if type(name) ~= "string" or name == "" then
    return nil, "asset name must be a non-empty string"
  end
  if #name > Assets.MAX_NAME_BYTES then
    return nil, ("asset name is longer than %d bytes"):format(Assets.MAX_NAME_BYTES)
  end
  if name:find("[%z\1-\31\127\\]") then
    return nil, ("unsafe asset name %q: control character or backslash"):format(name)
  end
  for segment in (name .. "/"):gmatch("([^/]*)/") do
    if segment == "" or segment:sub(1, 1) == "." then
      return nil, ("unsafe asset name %q: empty segment or one starting with '.'"):format(name)
    end
  end
  return true
end

--- Whether a value is an asset reference.
-- @param value any value
-- @return boolean
function Assets.is_reference(value)
  return type(value) == "table" and type(value.asset) == "string"
    and blob().parse_hash(value.asset) ~= nil and value.asset:sub(1, 7) == "sha256:"
end

--- The asset references in a story's data, each once (by hash and name).
-- @param data story data
-- @return array of `{sha256 = <hex>, name, size, type}`
function Assets.references(data)
  local found, seen, visited = {}, {}, {}
  local function walk(value, depth)
    if type(value) ~= "table" or depth > Assets.MAX_DEPTH or visited[value] then
      return
    end
    visited[value] = true
    if Assets.is_reference(value) then
      local sha = blob().parse_hash(value.asset)
      local name = type(value.name) == "string" and value.name or nil
      local key = sha .. "\0" .. tostring(name)
      if not seen[key] then
        seen[key] = true
        found[#found + 1] = { sha256 = sha, name = name, size = tonumber(value.size), type = value.type }
      end
      return
    end
    for _, child in pairs(value) do
      walk(child, depth + 1)
    end
  end
  walk(data, 1)
  return found
end

--- Creates the asset syncer of a storage folder.
-- @param options `{root, storage, transport, connect, server}`: `root` the
--   storage folder (e.g. ".whisker-storage"); `storage` the story storage
--   (for `list_stories`, `load_story` and the record through `backend`);
--   `transport` an HTTP transport with `put_asset`/`get_asset`, or `connect`
--   a function returning one (or nil and a message), called when an asset
--   first has to move; `server` the server URL the record of uploaded
--   assets belongs to
-- @return Assets
function Assets.new(options)
  local self = setmetatable({}, Assets)
  self.root = options.root or ".whisker-storage"
  self.storage = options.storage
  self.transport = options.transport
  self.connect = options.connect
  self.server = options.server
  return self
end

--- The transport, connected on first use.
-- @return transport, or nil and a message
function Assets:_transport()
  if not self.transport and self.connect then
    local transport, err = self.connect()
    if not transport then
      return nil, err
    end
    self.transport = transport
  end
  if not self.transport then
    return nil, "no transport to move assets with"
  end
  return self.transport
end

--- Path of the assets folder.
-- @return path
function Assets:folder()
  return self.root .. "/" .. Assets.FOLDER
end

--- Where a reference's file lives on this device.
-- @param ref a reference from `references`
-- @return path
function Assets:path_of(ref)
  if ref.name and Assets.check_name(ref.name) then
    return self:folder() .. "/" .. ref.name
  end
  return self:folder() .. "/" .. ref.sha256
end

local function backend(storage)
  return type(storage) == "table" and type(storage.backend) == "table" and storage.backend or nil
end

--- The record, loaded once per instance.
function Assets:_record()
  if self.record then
    return self.record
  end
  local record
  local store = backend(self.storage)
  if store and type(store.load) == "function" then
    local ok, loaded = pcall(store.load, store, Assets.RECORD_KEY)
    if ok and type(loaded) == "table" then
      record = loaded
    end
  end
  record = record or {}
  if type(record.on_server) ~= "table" or record.server ~= self.server then
    record.on_server = {}
  end
  record.server = self.server
  if type(record.files) ~= "table" then
    record.files = {}
  end
  self.record = record
  return record
end

--- Saves the record (best effort: without it assets are checked again).
function Assets:_save()
  local store = backend(self.storage)
  if self.record and store and type(store.save) == "function" then
    pcall(store.save, store, Assets.RECORD_KEY, self.record, {})
  end
end

--- The SHA-256 of a local file, cached by size and modification time.
-- @param path the file
-- @return hex digest, or nil when there is no such file
function Assets:_hash(path)
  local size, mtime = blob().file_stat(path)
  if not size then
    return nil
  end
  local files = self:_record().files
  local cached = files[path]
  if type(cached) == "table" and cached.size == size and cached.mtime == mtime then
    return cached.sha256
  end
  local sha = blob().sha256_file(path)
  if sha then
    files[path] = { sha256 = sha, size = size, mtime = mtime }
  end
  return sha
end

--- Every reference in every story of the storage.
-- @return array of references (each once per hash and name)
function Assets:collect()
  local refs, seen = {}, {}
  local storage = self.storage
  if type(storage) ~= "table" or type(storage.list_stories) ~= "function" then
    return refs
  end
  local listed = storage:list_stories() or {}
  for _, entry in ipairs(listed) do
    local id = type(entry) == "table" and entry.id or entry
    if type(id) == "string" and id:sub(1, 1) ~= "_" then
      local data = storage:load_story(id)
      for _, ref in ipairs(Assets.references(data)) do
        local key = ref.sha256 .. "\0" .. tostring(ref.name)
        if not seen[key] then
          seen[key] = true
          refs[#refs + 1] = ref
        end
      end
    end
  end
  return refs
end

--- Adds a file to the assets folder and returns the reference to put in a story.
-- @param path the file
-- @param name name in the assets folder (default: the file's own name)
-- @return `{asset = "sha256:…", name, size, type}`, or nil and a message
function Assets:add(path, name)
  name = name or tostring(path):match("([^/\\]+)$")
  local ok, err = Assets.check_name(name)
  if not ok then
    return nil, err
  end
  local sha, size = blob().sha256_file(path)
  if not sha then
    return nil, size
  end
  local dest = self:folder() .. "/" .. name
  if dest ~= path then
    local existing = self:_hash(dest)
    if existing and existing ~= sha then
      return nil, ("%s already holds a different file; choose another name"):format(dest)
    end
    if not existing then
      local copied, copy_err = blob().copy_file(path, dest)
      if not copied then
        return nil, copy_err
      end
    end
  end
  self:_hash(dest)
  self:_save()
  return { asset = blob().REF_PREFIX .. sha, name = name, size = size, type = Assets.type_of(name) }
end

--- A summary of one transfer pass.
local function summary()
  return { uploaded = 0, downloaded = 0, sent = 0, received = 0, problems = {} }
end

local function unsupported(err)
  return tostring(err):find("does not store assets", 1, true) ~= nil
end

--- Uploads the referenced assets this device has and the server may not:
-- run before a sync pushes the stories that reference them. A local file
-- whose content differs from its reference is not uploaded (`download`
-- reports it).
-- @param refs references (default: `collect()`)
-- @return `{uploaded, sent, problems, unsupported?}`
function Assets:upload(refs)
  refs = refs or self:collect()
  local result = summary()
  local on_server = self:_record().on_server
  for _, ref in ipairs(refs) do
    if not on_server[ref.sha256] and not result.unsupported then
      local path = self:path_of(ref)
      local local_sha = self:_hash(path)
      local transport, connect_err
      if local_sha == ref.sha256 then
        transport, connect_err = self:_transport()
      end
      if local_sha == ref.sha256 and not transport then
        result.problems[#result.problems + 1] = ("%s: %s"):format(path, tostring(connect_err))
      elseif local_sha == ref.sha256 then
        local sha, report = transport:put_asset(path)
        if sha then
          on_server[ref.sha256] = true
          if not report.skipped then
            result.uploaded = result.uploaded + 1
            result.sent = result.sent + (tonumber(report.sent) or 0)
          end
        elseif unsupported(report) then
          result.unsupported = true
        else
          result.problems[#result.problems + 1] = ("%s: %s"):format(path, tostring(report))
        end
      end
    end
  end
  self:_save()
  return result
end

--- Downloads the referenced assets missing on this device: run after a sync.
-- A local file that differs from the reference is replaced only when it is
-- an older version this device got from the server; otherwise it is kept
-- and reported.
-- @param refs references (default: `collect()`)
-- @return `{downloaded, received, problems, unsupported?}`
function Assets:download(refs)
  refs = refs or self:collect()
  local result = summary()
  local record = self:_record()
  local claimed = {}
  for _, ref in ipairs(refs) do
    local path = self:path_of(ref)
    local local_sha = self:_hash(path)
    if claimed[path] and claimed[path] ~= ref.sha256 then
      result.problems[#result.problems + 1] = ("%s: two stories reference different assets under this name")
        :format(path)
    elseif local_sha == ref.sha256 then
      claimed[path] = ref.sha256
    elseif local_sha and not record.on_server[local_sha] then
      claimed[path] = local_sha
      result.problems[#result.problems + 1] = ("%s differs from the sha256:%s the stories reference and "
        .. "was kept; 'whisker sync assets add %s' gives its new reference"):format(path,
        ref.sha256:sub(1, 12), path)
    elseif not result.unsupported then
      claimed[path] = ref.sha256
      local transport, err = self:_transport()
      local report
      if transport then
        report, err = transport:get_asset(ref.sha256, path)
      end
      if report then
        record.on_server[ref.sha256] = true
        self:_hash(path)
        result.downloaded = result.downloaded + 1
        result.received = result.received + (tonumber(report.received) or 0)
      elseif unsupported(err) then
        result.unsupported = true
      else
        result.problems[#result.problems + 1] = ("%s: %s"):format(path, tostring(err))
      end
    end
  end
  self:_save()
  return result
end

--- Where each referenced asset stands on this device, without the network.
-- @param refs references (default: `collect()`)
-- @return array of `{ref, path, present, changed, on_server}`
function Assets:status(refs)
  refs = refs or self:collect()
  local rows = {}
  local on_server = self:_record().on_server
  for _, ref in ipairs(refs) do
    local path = self:path_of(ref)
    local sha = self:_hash(path)
    rows[#rows + 1] = {
      ref = ref,
      path = path,
      present = sha == ref.sha256,
      changed = sha ~= nil and sha ~= ref.sha256,
      on_server = on_server[ref.sha256] == true,
    }
  end
  self:_save()
  return rows
end

return Assets
