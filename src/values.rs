//! Conversions between Lua values and the document model [`Value`] for the
//! transport and state-manager bindings, and `nil, message` results.

use mlua::ffi;
use mlua::{IntoLua, Lua, MultiValue, Value as LuaValue};
use sync_core::value::Value;

use crate::raw::{self, ConvertError};

/// A Lua value as a document (`nil` becomes `Null`).
pub(crate) fn from_lua(lua: &Lua, value: LuaValue) -> mlua::Result<Result<Value, ConvertError>> {
    let mut out = Value::Null;
    let done = raw::with_stack(lua, value, |state| unsafe {
        out = raw::to_value(state, 1)?;
        ffi::lua_settop(state, 0);
        Ok::<(), ConvertError>(())
    })?;
    Ok(done.map(|_| out))
}

/// A document as a new Lua value (`Null` becomes `nil`; JSON null members are left out).
pub(crate) fn to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    let pushed = raw::with_stack(lua, (), |state| unsafe { raw::push_value(state, value) })?;
    match pushed {
        Ok(values) => Ok(values.into_iter().next().unwrap_or(LuaValue::Nil)),
        Err(kind) => Err(mlua::Error::runtime(kind.to_string())),
    }
}

/// `nil, message`: the shape of an expected failure at the Lua edge.
pub(crate) fn failure(lua: &Lua, message: impl AsRef<str>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        LuaValue::Nil,
        LuaValue::String(lua.create_string(message.as_ref())?),
    ]))
}

/// A single successful result.
pub(crate) fn success(lua: &Lua, value: impl IntoLua) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([value.into_lua(lua)?]))
}

/// A Lua integer (a float on Lua 5.1 and LuaJIT, which have no integers).
pub(crate) fn integer(i: i64) -> LuaValue {
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    return LuaValue::Number(i as f64);
    #[cfg(not(any(feature = "lua51", feature = "luajit")))]
    LuaValue::Integer(i as _)
}

/// A Lua integer as `i64` (its width depends on the Lua flavour).
#[allow(
    clippy::unnecessary_cast,
    reason = "mlua::Integer is i64 only on some flavours"
)]
pub(crate) fn int64(i: mlua::Integer) -> i64 {
    i as i64
}
