//! The `whisker_sync` native Lua module: whisker-sync's Rust implementation
//! exposed to Lua. The Lua modules under `lua/whisker/storage/sync/` load it
//! and present the classes at the module paths whisker-core always used.

mod blob;
mod engine;
mod http;
mod protocol;
mod raw;
mod runtime;
mod state_manager;
mod story_hash;
mod values;
mod websocket;

use mlua::{Lua, Table};

/// The module's own allocations go to mimalloc, not the host's malloc: the
/// Lua heap's pattern of many small frees and table growth keeps glibc's
/// allocator consolidating free lists, which cost the engine a quarter of a
/// sync's time (bench/README.md). The local-dynamic TLS model suits a
/// library loaded with `dlopen`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Unit tests create Lua states of their own, so their binary links the
// flavour's Lua library (the module never does: the host provides Lua).
// Integration tests get the same from build.rs.
#[cfg(all(test, feature = "lua54"))]
#[link(name = "lua5.4")]
extern "C" {}
#[cfg(all(test, feature = "lua53"))]
#[link(name = "lua5.3")]
extern "C" {}
#[cfg(all(test, feature = "lua52"))]
#[link(name = "lua5.2")]
extern "C" {}
#[cfg(all(test, feature = "lua51"))]
#[link(name = "lua5.1")]
extern "C" {}
#[cfg(all(test, feature = "luajit"))]
#[link(name = "luajit-5.1")]
extern "C" {}

/// The Lua flavour this build targets, as the Lua modules check it.
const LUA_FLAVOUR: &str = if cfg!(feature = "luajit") {
    "luajit"
} else if cfg!(feature = "lua51") {
    "lua5.1"
} else if cfg!(feature = "lua52") {
    "lua5.2"
} else if cfg!(feature = "lua53") {
    "lua5.3"
} else {
    "lua5.4"
};

#[mlua::lua_module]
fn whisker_sync(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("version", env!("CARGO_PKG_VERSION"))?;
    exports.set("lua_flavour", LUA_FLAVOUR)?;
    exports.set("protocol", protocol::module(lua)?)?;
    exports.set("state_manager", state_manager::module(lua)?)?;
    exports.set("engine", engine::module(lua)?)?;
    exports.set("http", http::module(lua)?)?;
    exports.set("json", http::json_module(lua)?)?;
    exports.set("websocket", websocket::module(lua)?)?;
    exports.set("blob", blob::module(lua)?)?;
    Ok(exports)
}
