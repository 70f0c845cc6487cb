//! Links the cargo test binaries against the system Lua of the selected
//! flavour. The module itself never links Lua (mlua's `module` mode: the host
//! interpreter provides it), but the spec harness under `tests/` creates its own
//! Lua states and so needs the library.

fn main() {
    let enabled = |feature: &str| std::env::var_os(format!("CARGO_FEATURE_{feature}")).is_some();
    let library = if enabled("LUAJIT") {
        "luajit-5.1"
    } else if enabled("LUA51") {
        "lua5.1"
    } else if enabled("LUA52") {
        "lua5.2"
    } else if enabled("LUA53") {
        "lua5.3"
    } else {
        "lua5.4"
    };
    println!("cargo:rustc-link-arg-tests=-l{library}");
    println!("cargo:rerun-if-changed=build.rs");
}
