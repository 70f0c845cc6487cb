--- Test data made of bytes.
-- @module support.bytes

local M = {}

--- `n` bytes that do not compress, like images and audio (Park-Miller
-- sequence: exact in doubles, so every Lua flavour makes the same bytes).
-- The same `seed` gives the same bytes; it defaults to 1.
function M.noise(n, seed)
  local bytes, x = {}, seed or 1
  for i = 1, n do
    x = (x * 16807) % 2147483647
    bytes[i] = string.char(math.floor(x / 128) % 256)
  end
  return table.concat(bytes)
end

return M
