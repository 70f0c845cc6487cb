//! Direct access to the Lua stack for the paths where crossing the Lua/Rust
//! boundary dominates: converting stories, comparing them, and the protocol's
//! bulk functions.
//!
//! Everything here runs inside [`with_stack`], i.e. under `Lua::exec_raw`,
//! which calls it under `lua_pcall`. The raw operations used (`rawget`,
//! `rawset`, `next`, `createtable`, pushes) can only raise out-of-memory; that
//! unwinds to the protected call, leaking the Rust temporaries of the failed
//! call but never corrupting the Lua state.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use mlua::ffi::{self, lua_State};
use mlua::{IntoLuaMulti, Lua, MultiValue};
use sync_core::value::{integral, Map, Value};
use thiserror::Error;

pub(crate) type State = *mut lua_State;

/// Deepest table nesting accepted; deeper means a cycle or hostile input.
pub(crate) const MAX_DEPTH: usize = 100;

/// Why a Lua value could not become a story document.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub(crate) enum ConvertErrorKind {
    #[error("cyclic table")]
    Cycle,
    #[error("tables nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a {0} value cannot be synced")]
    Unsupported(&'static str),
    #[error("a {0} table key cannot be synced")]
    BadKey(&'static str),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("not enough Lua stack space")]
    StackFull,
}

/// A conversion failure and where in the value it happened (`data.passages[2]`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{kind}{}", self.location())]
pub(crate) struct ConvertError {
    pub kind: ConvertErrorKind,
    /// Path segments from the failing value up to the root (innermost first).
    path: Vec<String>,
}

impl ConvertError {
    pub fn new(kind: ConvertErrorKind) -> Self {
        ConvertError {
            kind,
            path: Vec::new(),
        }
    }

    fn within(mut self, segment: String) -> Self {
        self.path.push(segment);
        self
    }

    fn location(&self) -> String {
        if self.path.is_empty() {
            return String::new();
        }
        let mut location = String::from(" at ");
        for segment in self.path.iter().rev() {
            if !segment.starts_with('[') && location.len() > 4 {
                location.push('.');
            }
            location.push_str(segment);
        }
        location
    }
}

/// Runs `f` on the raw stack with `args` at indices 1..n, returning what it
/// leaves on the stack, or its error (nothing is returned then).
pub(crate) fn with_stack<E>(
    lua: &Lua,
    args: impl IntoLuaMulti,
    f: impl FnOnce(State) -> Result<(), E>,
) -> mlua::Result<Result<MultiValue, E>> {
    let mut outcome = Ok(());
    // SAFETY: `f` only uses the raw API on the stack it is given (see module docs).
    let values = unsafe {
        lua.exec_raw::<MultiValue>(args, |state| {
            outcome = f(state);
            if outcome.is_err() {
                ffi::lua_settop(state, 0);
            }
        })
    }?;
    Ok(outcome.map(|()| values))
}

/// Strings pushed once so that hot loops index tables with `lua_pushvalue`
/// instead of interning the same key again on every access.
pub(crate) struct Keys<const N: usize> {
    slots: [c_int; N],
}

impl<const N: usize> Keys<N> {
    /// Also reserves [`WORK_SLOTS`] stack slots for the caller's work.
    pub unsafe fn push(state: State, names: [&str; N]) -> Result<Self, ConvertErrorKind> {
        ensure_stack(state, N + WORK_SLOTS)?;
        let mut slots = [0; N];
        for (slot, name) in slots.iter_mut().zip(names) {
            push_str(state, name);
            *slot = ffi::lua_gettop(state);
        }
        Ok(Keys { slots })
    }

    /// Stack index of key `i`.
    pub fn at(&self, i: usize) -> c_int {
        self.slots[i]
    }
}

/// Stack slots a raw function may use on top of its arguments and keys without
/// checking again (loops reset the stack each iteration; recursion checks itself).
pub(crate) const WORK_SLOTS: usize = 16;

/// Makes the top value the only result: moves it to index 1 and drops the rest.
pub(crate) unsafe fn return_top(state: State) {
    if ffi::lua_gettop(state) > 1 {
        ffi::lua_replace(state, 1);
    }
    ffi::lua_settop(state, 1);
}

pub(crate) unsafe fn push_bytes(state: State, s: &[u8]) {
    ffi::lua_pushlstring(state, s.as_ptr().cast(), s.len());
}

pub(crate) unsafe fn ensure_stack(state: State, n: usize) -> Result<(), ConvertErrorKind> {
    if ffi::lua_checkstack(state, n as c_int) == 0 {
        return Err(ConvertErrorKind::StackFull);
    }
    Ok(())
}

pub(crate) unsafe fn push_str(state: State, s: &str) {
    push_bytes(state, s.as_bytes());
}

/// Pushes `table[key]` (raw; `key` is a stack index) and returns its type.
pub(crate) unsafe fn get(state: State, table: c_int, key: c_int) -> c_int {
    let table = ffi::lua_absindex(state, table);
    ffi::lua_pushvalue(state, key);
    ffi::lua_rawget(state, table)
}

/// Pops the top value into `table[key]` (raw; `key` is a stack index).
pub(crate) unsafe fn set(state: State, table: c_int, key: c_int) {
    let table = ffi::lua_absindex(state, table);
    ffi::lua_pushvalue(state, key);
    ffi::lua_insert(state, -2);
    ffi::lua_rawset(state, table);
}

/// The bytes of the string at `idx`. Valid while that string stays referenced.
pub(crate) unsafe fn bytes<'a>(state: State, idx: c_int) -> &'a [u8] {
    let mut len = 0;
    let ptr = ffi::lua_tolstring(state, idx, &mut len);
    std::slice::from_raw_parts(ptr.cast(), len)
}

/// Gives each distinct string one address, so that strings can be hashed and
/// compared as addresses: Lua interns short strings itself, and longer ones
/// (rare as ids) take the address of the first equal string seen.
#[derive(Default)]
pub(crate) struct StringIdentities<'a> {
    long: HashMap<&'a [u8], *const u8>,
}

impl<'a> StringIdentities<'a> {
    /// The identity of the string at `idx` (which must be a string). Valid
    /// while that string stays referenced.
    #[inline]
    pub unsafe fn of(&mut self, state: State, idx: c_int) -> *const u8 {
        let s: &'a [u8] = bytes(state, idx);
        if s.len() <= interned_length() {
            s.as_ptr()
        } else {
            *self.long.entry(s).or_insert(s.as_ptr())
        }
    }
}

/// How long a string this Lua interns at most (Lua 5.4: 40 bytes; Lua 5.1 and
/// LuaJIT intern all, counted here up to [`PROBED_LENGTH`]). Measured once,
/// from the Lua the module was opened in: each build links one Lua.
pub(crate) fn interned_length() -> usize {
    INTERNED_LENGTH.load(Ordering::Relaxed)
}

/// Longest length [`probe_interned_length`] tries.
const PROBED_LENGTH: usize = 64;

/// 0 until probed: then no string is taken as interned.
static INTERNED_LENGTH: AtomicUsize = AtomicUsize::new(0);

/// Finds the longest string length for which two equal strings pushed
/// separately are one object, and records it for [`StringIdentities`].
pub(crate) unsafe fn probe_interned_length(state: State) -> Result<(), ConvertErrorKind> {
    ensure_stack(state, 2)?;
    let (first, second) = ([b'~'; PROBED_LENGTH], [b'~'; PROBED_LENGTH]);
    let interned = (1..=PROBED_LENGTH)
        .take_while(|&len| {
            ffi::lua_pushlstring(state, first.as_ptr().cast(), len);
            ffi::lua_pushlstring(state, second.as_ptr().cast(), len);
            let same = bytes(state, -1).as_ptr() == bytes(state, -2).as_ptr();
            ffi::lua_settop(state, -3);
            same
        })
        .count();
    INTERNED_LENGTH.store(interned, Ordering::Relaxed);
    Ok(())
}

/// The string at `idx` if it is one (no number coercion).
pub(crate) unsafe fn string_at<'a>(state: State, idx: c_int) -> Option<&'a [u8]> {
    (ffi::lua_type(state, idx) == ffi::LUA_TSTRING).then(|| bytes(state, idx))
}

/// The number at `idx`, as the document model holds it.
pub(crate) unsafe fn number_at(state: State, idx: c_int) -> Value {
    if ffi::lua_isinteger(state, idx) != 0 {
        Value::Int(ffi::lua_tointeger(state, idx) as i64)
    } else {
        Value::Float(ffi::lua_tonumber(state, idx))
    }
}

pub(crate) unsafe fn type_name(state: State, idx: c_int) -> &'static str {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TNIL => "nil",
        ffi::LUA_TBOOLEAN => "boolean",
        ffi::LUA_TNUMBER => "number",
        ffi::LUA_TSTRING => "string",
        ffi::LUA_TTABLE => "table",
        ffi::LUA_TFUNCTION => "function",
        ffi::LUA_TTHREAD => "thread",
        _ => "userdata",
    }
}

/// Reads the value at `idx` into the document model. Tables whose keys are
/// exactly 1..n (n > 0) become arrays; others become objects (number keys
/// written as text); an empty table is an empty object.
pub(crate) unsafe fn to_value(state: State, idx: c_int) -> Result<Value, ConvertError> {
    let mut path = Vec::new();
    read(state, ffi::lua_absindex(state, idx), &mut path)
}

unsafe fn read(
    state: State,
    idx: c_int,
    path: &mut Vec<*const c_void>,
) -> Result<Value, ConvertError> {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TNIL => Ok(Value::Null),
        ffi::LUA_TBOOLEAN => Ok(Value::Bool(ffi::lua_toboolean(state, idx) != 0)),
        ffi::LUA_TNUMBER => Ok(number_at(state, idx)),
        ffi::LUA_TSTRING => std::str::from_utf8(bytes(state, idx))
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|_| ConvertError::new(ConvertErrorKind::InvalidUtf8)),
        ffi::LUA_TTABLE => read_table(state, idx, path),
        _ => Err(ConvertError::new(ConvertErrorKind::Unsupported(type_name(
            state, idx,
        )))),
    }
}

unsafe fn read_table(
    state: State,
    idx: c_int,
    path: &mut Vec<*const c_void>,
) -> Result<Value, ConvertError> {
    let identity = ffi::lua_topointer(state, idx);
    if path.contains(&identity) {
        return Err(ConvertError::new(ConvertErrorKind::Cycle));
    }
    if path.len() >= MAX_DEPTH {
        return Err(ConvertError::new(ConvertErrorKind::TooDeep));
    }
    ensure_stack(state, 4).map_err(ConvertError::new)?;
    path.push(identity);
    let len = ffi::lua_rawlen(state, idx);
    let mut items: Vec<Option<Value>> = Vec::new();
    let mut members = Map::new();
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        let value_idx = ffi::lua_gettop(state);
        let key_idx = value_idx - 1;
        let entry = match ffi::lua_type(state, key_idx) {
            ffi::LUA_TNUMBER => match number_at(state, key_idx) {
                Value::Int(i) if i >= 1 && (i as u64) <= len as u64 => {
                    Ok(EntryKey::Index(i as usize - 1))
                }
                Value::Int(i) => Ok(EntryKey::Name(i.to_string())),
                Value::Float(f) => Ok(EntryKey::Name(f.to_string())),
                _ => unreachable!("number_at returns numbers"),
            },
            ffi::LUA_TSTRING => std::str::from_utf8(bytes(state, key_idx))
                .map(|s| EntryKey::Name(s.to_owned()))
                .map_err(|_| ConvertError::new(ConvertErrorKind::InvalidUtf8)),
            _ => Err(ConvertError::new(ConvertErrorKind::BadKey(type_name(
                state, key_idx,
            )))),
        };
        let entry = entry.and_then(|key| {
            let value = read(state, value_idx, path).map_err(|e| e.within(key.segment()))?;
            Ok((key, value))
        });
        ffi::lua_settop(state, key_idx);
        match entry {
            Ok((EntryKey::Index(i), value)) => {
                if items.is_empty() {
                    items.resize(len, None);
                }
                items[i] = Some(value);
            }
            Ok((EntryKey::Name(name), value)) => {
                members.insert(name, value);
            }
            Err(e) => {
                ffi::lua_settop(state, key_idx - 1);
                path.pop();
                return Err(e);
            }
        }
    }
    path.pop();
    let dense = !items.is_empty() && items.iter().all(Option::is_some);
    if dense && members.is_empty() {
        return Ok(Value::Array(items.into_iter().flatten().collect()));
    }
    for (i, item) in items.into_iter().enumerate() {
        if let Some(value) = item {
            members.insert((i + 1).to_string(), value);
        }
    }
    Ok(Value::Object(members))
}

enum EntryKey {
    Index(usize),
    Name(String),
}

impl EntryKey {
    fn segment(&self) -> String {
        match self {
            EntryKey::Index(i) => format!("[{}]", i + 1),
            EntryKey::Name(name) => name.clone(),
        }
    }
}

/// Pushes `value` as a Lua value (`Null` becomes nil; null array items leave holes).
pub(crate) unsafe fn push_value(state: State, value: &Value) -> Result<(), ConvertErrorKind> {
    ensure_stack(state, 3)?;
    match value {
        Value::Null => ffi::lua_pushnil(state),
        Value::Bool(b) => ffi::lua_pushboolean(state, *b as c_int),
        Value::Int(i) => push_int(state, *i),
        Value::Float(f) => ffi::lua_pushnumber(state, *f),
        Value::Str(s) => push_str(state, s),
        Value::Array(items) => {
            ffi::lua_createtable(state, items.len() as c_int, 0);
            for (i, item) in items.iter().enumerate() {
                if !item.is_null() {
                    push_value(state, item)?;
                    ffi::lua_rawseti(state, -2, (i + 1) as _);
                }
            }
        }
        Value::Object(members) => {
            ffi::lua_createtable(state, 0, members.len() as c_int);
            for (key, member) in members {
                if !member.is_null() {
                    push_str(state, key);
                    push_value(state, member)?;
                    ffi::lua_rawset(state, -3);
                }
            }
        }
    }
    Ok(())
}

/// Pushes an integer; Lua 5.1 and LuaJIT hold it as a float.
pub(crate) unsafe fn push_int(state: State, i: i64) {
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    ffi::lua_pushnumber(state, i as f64);
    #[cfg(not(any(feature = "lua51", feature = "luajit")))]
    ffi::lua_pushinteger(state, i as _);
}

/// Reads an integer (integral floats included, as Lua 5.1 stores every number).
pub(crate) unsafe fn integer_at(state: State, idx: c_int) -> Option<i64> {
    if ffi::lua_type(state, idx) != ffi::LUA_TNUMBER {
        return None;
    }
    match number_at(state, idx) {
        Value::Int(i) => Some(i),
        Value::Float(f) => integral(f),
        _ => None,
    }
}

/// Semantic deep equality of the values at `a` and `b`, the same relation as
/// `Value`'s `==` on their conversions (numbers by value with NaN equal to
/// itself, tables by contents), computed in place without converting.
pub(crate) unsafe fn deep_equal(
    state: State,
    a: c_int,
    b: c_int,
) -> Result<bool, ConvertErrorKind> {
    // Each nesting level holds three stack slots: reserve them all at once.
    ensure_stack(state, 3 * MAX_DEPTH + 3)?;
    equal_at(
        state,
        ffi::lua_absindex(state, a),
        ffi::lua_absindex(state, b),
        MAX_DEPTH,
    )
    .ok_or(ConvertErrorKind::TooDeep)
}

/// `None` when tables nest more than `levels_left` deep.
unsafe fn equal_at(state: State, a: c_int, b: c_int, levels_left: usize) -> Option<bool> {
    // Raw equality settles most values in one call: the same table, equal
    // strings, and numbers (Lua compares 1 and 1.0 as equal).
    if ffi::lua_rawequal(state, a, b) != 0 {
        return Some(true);
    }
    unequal_raw_values_equal(state, a, b, ffi::lua_type(state, b), levels_left)
}

/// Equality of two values that are not raw-equal, the type of `b` given:
/// tables by contents, NaN equal to NaN, anything else is different.
unsafe fn unequal_raw_values_equal(
    state: State,
    a: c_int,
    b: c_int,
    type_b: c_int,
    levels_left: usize,
) -> Option<bool> {
    match (ffi::lua_type(state, a), type_b) {
        (ffi::LUA_TTABLE, ffi::LUA_TTABLE) if levels_left == 0 => None,
        (ffi::LUA_TTABLE, ffi::LUA_TTABLE) => tables_equal(state, a, b, levels_left - 1),
        (ffi::LUA_TNUMBER, ffi::LUA_TNUMBER) => {
            Some(ffi::lua_tonumber(state, a).is_nan() && ffi::lua_tonumber(state, b).is_nan())
        }
        _ => Some(false),
    }
}

/// Looks each key of `a` up in `b`, then counts `b`.
unsafe fn tables_equal(state: State, a: c_int, b: c_int, levels_left: usize) -> Option<bool> {
    let base = ffi::lua_gettop(state);
    let (key, value_a, value_b) = (base + 1, base + 2, base + 3);
    let mut count_a = 0usize;
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, a) != 0 {
        count_a += 1;
        ffi::lua_pushvalue(state, key);
        let type_b = ffi::lua_rawget(state, b);
        // Most entries are equal strings and numbers: settle them without a call.
        if ffi::lua_rawequal(state, value_a, value_b) == 0 {
            match unequal_raw_values_equal(state, value_a, value_b, type_b, levels_left) {
                Some(true) => {}
                other => {
                    ffi::lua_settop(state, base);
                    return other;
                }
            }
        }
        ffi::lua_settop(state, key);
    }
    Some(count_a == entry_count(state, b))
}

/// Copies the entries of the table at `src` into the table at `dst` (raw, shallow).
pub(crate) unsafe fn copy_entries(
    state: State,
    src: c_int,
    dst: c_int,
) -> Result<(), ConvertErrorKind> {
    ensure_stack(state, 4)?;
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, src) != 0 {
        ffi::lua_pushvalue(state, -2);
        ffi::lua_insert(state, -2);
        ffi::lua_rawset(state, dst);
    }
    Ok(())
}

/// Number of entries in the table at `idx`.
pub(crate) unsafe fn entry_count(state: State, idx: c_int) -> usize {
    let mut count = 0;
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        count += 1;
        ffi::lua_settop(state, -2);
    }
    count
}
