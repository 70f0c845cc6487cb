--- Output captured from code that writes to stdout/stderr-like streams, so
-- a spec can check what a user would see.
-- @module support.output

local M = {}

--- A stream that remembers what was written: `write(...)` (chainable, like a
-- file's), `flush()`, `text()` for everything so far, and `clear()` to start
-- again between commands.
function M.buffer()
  local chunks = {}
  return {
    write = function(self, ...)
      for i = 1, select("#", ...) do
        chunks[#chunks + 1] = tostring((select(i, ...)))
      end
      return self
    end,
    flush = function() end,
    text = function()
      return table.concat(chunks)
    end,
    clear = function()
      chunks = {}
    end,
  }
end

return M
