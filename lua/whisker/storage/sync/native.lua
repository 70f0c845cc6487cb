--- Loads whisker-sync's native module (`whisker_sync`).
--
-- Found through `package.cpath` when installed; in a source checkout the
-- module is also found in `build/<flavour>/` beside `lua/`, so specs run with
-- only `--lpath` pointing at this tree still get it.
-- @module whisker.storage.sync.native

--- The Lua flavour this interpreter is, named as the build directories are.
local function flavour()
  if type(jit) == "table" then
    return "luajit"
  end
  return "lua" .. _VERSION:match("%d+%.%d+")
end

--- Directory holding this file's `lua/` tree, or nil when loaded otherwise.
local function source_root()
  local source = debug.getinfo(1, "S").source
  return source:match("^@(.*)[/\\]whisker[/\\]storage[/\\]sync[/\\]native%.lua$")
end

local function load_from_checkout()
  local root = source_root()
  if not root then
    return nil, "not loaded from a source checkout"
  end
  local path = root .. "/../build/" .. flavour() .. "/whisker_sync.so"
  local loader, err = package.loadlib(path, "luaopen_whisker_sync")
  if not loader then
    return nil, err
  end
  local native = loader("whisker_sync")
  package.loaded["whisker_sync"] = native
  return native
end

local native = package.loaded["whisker_sync"]
if not native then
  local ok, result = pcall(require, "whisker_sync")
  if ok then
    native = result
  else
    local from_checkout, checkout_err = load_from_checkout()
    if not from_checkout then
      error(("whisker-sync native module not found for %s.\n%s\nbuild tree: %s"):format(
        flavour(), tostring(result), tostring(checkout_err)), 2)
    end
    native = from_checkout
  end
end

if native.lua_flavour ~= flavour() then
  error(("whisker_sync was built for %s but this interpreter is %s"):format(
    tostring(native.lua_flavour), flavour()), 2)
end

return native
