//! Runs the busted specs in `spec/` under `cargo test`, so a Rust developer
//! needs nothing but cargo: each spec file gets a fresh Lua state created by
//! mlua (the flavour selected by cargo features) with busted's real runner
//! driven inside it.
//!
//! The module is the one compiled into this test binary, registered in
//! `package.preload`: `cargo test` does not build the cdylib, and a `.so` left
//! by an earlier build may be for another flavour. `make test` also runs the
//! specs on the system interpreters against the built `.so` files.

use std::ffi::c_int;
use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};
use mlua::{ffi::lua_State, Lua};

// Links the module crate; its entry point is the `luaopen_` symbol Lua calls.
use whisker_sync as _;

extern "C-unwind" {
    fn luaopen_whisker_sync(state: *mut lua_State) -> c_int;
}

fn main() {
    let args = Arguments::from_args();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut specs: Vec<PathBuf> = std::fs::read_dir(root.join("spec"))
        .expect("spec/ directory")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.to_string_lossy().ends_with("_spec.lua"))
        .collect();
    specs.sort();
    let trials = specs
        .into_iter()
        .map(|spec| {
            let name = spec.file_stem().unwrap().to_string_lossy().into_owned();
            let root = root.clone();
            Trial::test(name, move || run_spec(&root, &spec))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn lua_string(s: &Path) -> String {
    format!("{:?}", s.to_string_lossy())
}

fn run_spec(root: &Path, spec: &Path) -> Result<(), Failed> {
    // SAFETY: the state must load C modules (busted's dependencies).
    let lua = unsafe { Lua::unsafe_new() };
    // SAFETY: the entry point follows the lua_CFunction protocol.
    let open_module = unsafe { lua.create_c_function(luaopen_whisker_sync) }
        .map_err(|e| Failed::from(e.to_string()))?;
    let preload: mlua::Table = lua
        .globals()
        .get::<mlua::Table>("package")
        .and_then(|package| package.get("preload"))
        .map_err(|e| Failed::from(e.to_string()))?;
    preload
        .set("whisker_sync", open_module)
        .map_err(|e| Failed::from(e.to_string()))?;
    let lua_dir = root.join("lua");
    let setup = format!(
        r#"
        package.path = {lua}.."/?.lua;"..{lua}.."/?/init.lua;"..{spec_dir}.."/?.lua;"..package.path
        arg = {{ [0] = "busted", "--output=plainTerminal", {spec} }}
        -- Not standalone, busted returns when every test passed and calls
        -- os.exit otherwise; turn that exit into a value for this harness.
        os.exit = function(code) error({{ busted_exit = code }}, 0) end
        local ok, err = pcall(require("busted.runner"), {{ standalone = false }})
        if ok then
          return true, ""
        end
        if type(err) == "table" and err.busted_exit ~= nil then
          return false, "busted exited with " .. tostring(err.busted_exit) .. " (failures + errors)"
        end
        return false, tostring(err)
        "#,
        lua = lua_string(&lua_dir),
        spec_dir = lua_string(&root.join("spec")),
        spec = lua_string(spec),
    );
    let (passed, message): (bool, String) = lua
        .load(setup)
        .set_name(spec.to_string_lossy())
        .eval()
        .map_err(|e| Failed::from(format!("Lua error: {e}")))?;
    if passed {
        Ok(())
    } else {
        Err(message.into())
    }
}
