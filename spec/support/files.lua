--- Files and folders for specs that work on disk: a fresh temporary folder
-- per test, and whole-file reads and writes in binary mode (asset bytes must
-- come back exactly as they were written).
-- @module support.files

local M = {}

--- Creates a new empty folder and returns its path.
function M.tempdir()
  -- os.tmpname reserves a unique name (as a file on POSIX); the folder takes
  -- its place.
  local name = os.tmpname()
  os.remove(name)
  assert(os.execute(("mkdir -p %q"):format(name)))
  return name
end

--- Removes a folder and everything in it.
function M.remove_tree(path)
  os.execute(("rm -rf %q"):format(path))
end

--- The whole content of `path`, or nil when it cannot be opened (so a spec
-- can assert that a file is absent).
function M.read(path)
  local file = io.open(path, "rb")
  if not file then
    return nil
  end
  local data = file:read("*a")
  file:close()
  return data
end

--- Writes `data` to `path`, replacing what was there.
function M.write(path, data)
  local file = assert(io.open(path, "wb"))
  file:write(data)
  file:close()
end

return M
