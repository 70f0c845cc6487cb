--- Small file and shell helpers shared by the command and the file store.
-- @module whisker.sync.files

local M = {}

--- The whole content of a file, or nil when it cannot be read.
-- @string path
-- @treturn ?string
function M.read(path)
  local file = io.open(path, "rb")
  if not file then
    return nil
  end
  local content = file:read("*a")
  file:close()
  return content
end

--- Whether a file (or directory) can be opened for reading.
-- @string path
-- @treturn boolean
function M.exists(path)
  local file = io.open(path, "rb")
  if file then
    file:close()
    return true
  end
  return false
end

--- `s` as one single-quoted POSIX shell word.
-- @param s any value; converted with `tostring`
-- @treturn string
function M.shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

return M
