-- whisker-sync as a LuaRocks package, built from a source checkout:
--
--   luarocks make rockspec/whisker-sync-scm-1.rockspec [--tree <dir>] [--lua-version 5.4]
--
-- The native module is compiled by cargo for the Lua that LuaRocks targets;
-- only LuaRocks' built-in `make` build type is used, so no LuaRocks server or
-- build backend is needed.
rockspec_format = "3.0"
package = "whisker-sync"
version = "scm-1"
source = {
  url = "git+https://github.com/writewhisker/whisker-sync.git",
}
description = {
  summary = "Offline-first story sync for whisker-core, in Rust",
  detailed = [[
whisker-sync keeps a writer's whisker-core stories identical across devices:
offline-first, deltas and deletes, conflict strategies, a reference server.
It is a drop-in for whisker.storage.sync.* with the same Lua API.
]],
  homepage = "https://github.com/writewhisker/whisker-sync",
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.5",
}
build = {
  type = "make",
  build_target = "rock-build",
  build_variables = {
    LUA = "$(LUA)",
  },
  install_target = "rock-install",
  install_variables = {
    LUA = "$(LUA)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}
