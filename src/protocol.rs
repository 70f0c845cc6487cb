//! `whisker.storage.sync.protocol` for Lua: the functions of `sync_core::protocol`
//! and `sync_core::version_vector` over Lua tables.
//!
//! Operations and story data stay Lua tables: functions read only the fields
//! they need and hand back the caller's own tables where the old API did
//! (an operation's `data`, a resolution's winning operation), so nothing is
//! converted unless it has to be (auto-merge).
//!
//! Failures a caller can cause come back as `nil, message`; the Lua module
//! raises them (see `lua/whisker/storage/sync/protocol.lua`).

use std::ffi::c_int;

use mlua::ffi;
use mlua::{Lua, MultiValue, Table, Value as LuaValue};
use sync_core::protocol::{
    self, conflict_between, last_write_wins, shared_stories, ConflictStrategy, OpHeader, OpType,
    OrderKey, Side,
};
use sync_core::value::Value;
use sync_core::version_vector::{self, Versions};
use thiserror::Error;

use crate::raw::{self, ConvertError, ConvertErrorKind, Keys, State, StringIdentities};

/// Misuse of a protocol function, reported to Lua as a message.
#[derive(Debug, Error)]
enum ProtocolCallError {
    #[error("bad argument #{position} to '{function}' (table expected, got {got})")]
    NotATable {
        position: usize,
        function: &'static str,
        got: &'static str,
    },
    #[error("{what}: {source}")]
    Convert { what: String, source: ConvertError },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
}

impl From<ConvertErrorKind> for ProtocolCallError {
    fn from(kind: ConvertErrorKind) -> Self {
        ProtocolCallError::Invalid(kind.to_string())
    }
}

type CallResult = Result<(), ProtocolCallError>;

/// Returns the values left on the stack, or `nil, message`.
fn respond(
    lua: &Lua,
    outcome: mlua::Result<Result<MultiValue, ProtocolCallError>>,
) -> mlua::Result<MultiValue> {
    match outcome? {
        Ok(values) => Ok(values),
        Err(e) => Ok(MultiValue::from_iter([
            LuaValue::Nil,
            LuaValue::String(lua.create_string(e.to_string())?),
        ])),
    }
}

unsafe fn expect_table(state: State, idx: c_int, function: &'static str) -> CallResult {
    if ffi::lua_type(state, idx) != ffi::LUA_TTABLE {
        return Err(ProtocolCallError::NotATable {
            position: idx as usize,
            function,
            got: raw::type_name(state, idx),
        });
    }
    Ok(())
}

/// Field names used on operation, conflict and resolution tables.
pub(crate) const FIELDS: [&str; 20] = [
    "id",
    "type",
    "story_id",
    "data",
    "metadata",
    "timestamp",
    "device_id",
    "version",
    "base_version",
    "local_operations",
    "remote_operations",
    "local_version",
    "remote_version",
    "conflict_type",
    "winner",
    "operation",
    "local_copy",
    "remote_copy",
    "original_id",
    "source",
];
pub(crate) const ID: usize = 0;
pub(crate) const TYPE: usize = 1;
pub(crate) const STORY_ID: usize = 2;
pub(crate) const DATA: usize = 3;
pub(crate) const METADATA: usize = 4;
pub(crate) const TIMESTAMP: usize = 5;
pub(crate) const DEVICE_ID: usize = 6;
pub(crate) const VERSION: usize = 7;
pub(crate) const BASE_VERSION: usize = 8;
const LOCAL_OPERATIONS: usize = 9;
const REMOTE_OPERATIONS: usize = 10;
const LOCAL_VERSION: usize = 11;
const REMOTE_VERSION: usize = 12;
const CONFLICT_TYPE: usize = 13;
const WINNER: usize = 14;
const OPERATION: usize = 15;
const LOCAL_COPY: usize = 16;
const REMOTE_COPY: usize = 17;
const ORIGINAL_ID: usize = 18;
const SOURCE: usize = 19;

pub(crate) type FieldKeys = Keys<{ FIELDS.len() }>;

/// Pushes `table[field]` and returns its type.
unsafe fn field(state: State, keys: &FieldKeys, table: c_int, name: usize) -> c_int {
    raw::get(state, table, keys.at(name))
}

/// Pops the top value into `table[field]`.
pub(crate) unsafe fn set_field(state: State, keys: &FieldKeys, table: c_int, name: usize) {
    raw::set(state, table, keys.at(name))
}

/// Pushes a new operation table `{id, type, story_id, data, metadata, timestamp, device_id}`.
/// Arguments are stack indices (0 = absent); `metadata` defaults to a new table and
/// `device_id` to `metadata.device_id` or `"unknown"`.
unsafe fn push_operation(
    state: State,
    keys: &FieldKeys,
    op_type: c_int,
    story_id: c_int,
    data: c_int,
    metadata: c_int,
) {
    ffi::lua_createtable(state, 0, 7);
    let op = ffi::lua_gettop(state);
    raw::push_str(state, &protocol::new_operation_id());
    set_field(state, keys, op, ID);
    for (idx, name) in [(op_type, TYPE), (story_id, STORY_ID), (data, DATA)] {
        if idx != 0 {
            ffi::lua_pushvalue(state, idx);
            set_field(state, keys, op, name);
        }
    }
    if metadata != 0 && ffi::lua_type(state, metadata) == ffi::LUA_TTABLE {
        ffi::lua_pushvalue(state, metadata);
        if field(state, keys, metadata, DEVICE_ID) == ffi::LUA_TNIL {
            ffi::lua_settop(state, -2);
            raw::push_str(state, "unknown");
        }
    } else {
        ffi::lua_createtable(state, 0, 0);
        raw::push_str(state, "unknown");
    }
    set_field(state, keys, op, DEVICE_ID);
    set_field(state, keys, op, METADATA);
    raw::push_int(state, protocol::now_seconds());
    set_field(state, keys, op, TIMESTAMP);
}

/// `create_operation(op_type, story_id, data, metadata?)`.
fn create_operation(
    lua: &Lua,
    (op_type, story_id, data, metadata): (LuaValue, LuaValue, LuaValue, LuaValue),
) -> mlua::Result<MultiValue> {
    respond(
        lua,
        raw::with_stack(lua, (op_type, story_id, data, metadata), |state| unsafe {
            let keys = FieldKeys::push(state, FIELDS)?;
            push_operation(state, &keys, 1, 2, 3, 4);
            raw::return_top(state);
            Ok(())
        }),
    )
}

/// Operations read between resets of the stack in [`story_ids`]: each leaves
/// its table and id on the stack, which saves a `lua_settop` per operation.
const IDS_PER_RESET: usize = 32;

/// The identity of the `story_id` of each operation in the array at `list`
/// (absolute index).
unsafe fn story_ids(
    state: State,
    keys: &FieldKeys,
    identities: &mut StringIdentities,
    list: c_int,
    side: &str,
) -> Result<Vec<*const u8>, ProtocolCallError> {
    raw::ensure_stack(state, 2 * IDS_PER_RESET)?;
    let count = ffi::lua_rawlen(state, list);
    let mut ids = Vec::with_capacity(count);
    let base = ffi::lua_gettop(state);
    let key = keys.at(STORY_ID);
    for i in 1..=count {
        if (i - 1) % IDS_PER_RESET == 0 {
            ffi::lua_settop(state, base);
        }
        if ffi::lua_rawgeti(state, list, i as _) != ffi::LUA_TTABLE {
            return Err(ProtocolCallError::Invalid(format!(
                "{side}[{i}] is not an operation table"
            )));
        }
        ffi::lua_pushvalue(state, key);
        if ffi::lua_rawget(state, -2) != ffi::LUA_TSTRING {
            return Err(ProtocolCallError::Invalid(format!(
                "{side}[{i}].story_id must be a string"
            )));
        }
        // The string stays referenced by the operation, which the caller's list keeps
        // alive, so its address stays its identity for the call.
        ids.push(identities.of(state, -1));
    }
    ffi::lua_settop(state, base);
    Ok(ids)
}

/// Reads what conflict detection needs from the operation at `op`.
unsafe fn op_header(state: State, keys: &FieldKeys, op: c_int) -> OpHeader {
    let version_field = |name| {
        field(state, keys, op, name);
        let v = raw::integer_at(state, -1).and_then(|v| u64::try_from(v).ok());
        ffi::lua_settop(state, -2);
        v
    };
    field(state, keys, op, TYPE);
    let op_type = raw::string_at(state, -1)
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(OpType::parse);
    ffi::lua_settop(state, -2);
    OpHeader {
        op_type,
        version: version_field(VERSION),
        base_version: version_field(BASE_VERSION),
    }
}

/// Pushes a new array of the operations `indices` (0-based) of the list at `list`.
unsafe fn push_op_list(state: State, list: c_int, len: u32, indices: impl Iterator<Item = usize>) {
    ffi::lua_createtable(state, len as c_int, 0);
    for (n, i) in indices.enumerate() {
        ffi::lua_rawgeti(state, list, (i + 1) as _);
        ffi::lua_rawseti(state, -2, (n + 1) as _);
    }
}

/// `detect_conflicts(local_ops, remote_ops)`.
fn detect_conflicts(lua: &Lua, (local, remote): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    respond(
        lua,
        raw::with_stack(lua, (local, remote), |state| unsafe {
            expect_table(state, 1, "detect_conflicts")?;
            expect_table(state, 2, "detect_conflicts")?;
            let keys = FieldKeys::push(state, FIELDS)?;
            let mut identities = StringIdentities::default();
            let local_ids = story_ids(state, &keys, &mut identities, 1, "local_ops")?;
            let remote_ids = story_ids(state, &keys, &mut identities, 2, "remote_ops")?;
            let shared = shared_stories(&local_ids, &remote_ids);
            ffi::lua_createtable(state, shared.stories.len() as c_int, 0);
            let out = ffi::lua_gettop(state);
            let mut n = 0;
            for story in &shared.stories {
                ffi::lua_rawgeti(state, 1, (story.local.last() + 1) as _);
                ffi::lua_rawgeti(state, 2, (story.remote.last() + 1) as _);
                let (local_op, remote_op) = (out + 1, out + 2);
                let verdict = conflict_between(
                    &op_header(state, &keys, local_op),
                    &op_header(state, &keys, remote_op),
                );
                let Some(conflict_type) = verdict else {
                    ffi::lua_settop(state, out);
                    continue;
                };
                ffi::lua_createtable(state, 0, 6);
                let conflict = ffi::lua_gettop(state);
                field(state, &keys, local_op, STORY_ID);
                set_field(state, &keys, conflict, STORY_ID);
                push_op_list(state, 1, story.local.len, shared.local_indices(story));
                set_field(state, &keys, conflict, LOCAL_OPERATIONS);
                push_op_list(state, 2, story.remote.len, shared.remote_indices(story));
                set_field(state, &keys, conflict, REMOTE_OPERATIONS);
                ffi::lua_pushvalue(state, local_op);
                set_field(state, &keys, conflict, LOCAL_VERSION);
                ffi::lua_pushvalue(state, remote_op);
                set_field(state, &keys, conflict, REMOTE_VERSION);
                raw::push_str(state, conflict_type.as_str());
                set_field(state, &keys, conflict, CONFLICT_TYPE);
                n += 1;
                ffi::lua_rawseti(state, out, n);
                ffi::lua_settop(state, out);
            }
            raw::return_top(state);
            Ok(())
        }),
    )
}

/// An operation's last-write-wins key, read from the table at `op`.
struct OrderFields {
    timestamp: f64,
    device_id: Vec<u8>,
    op_id: Vec<u8>,
}

impl OrderFields {
    unsafe fn read(
        state: State,
        keys: &FieldKeys,
        op: c_int,
        side: &str,
    ) -> Result<Self, ProtocolCallError> {
        field(state, keys, op, TIMESTAMP);
        if ffi::lua_type(state, -1) != ffi::LUA_TNUMBER {
            return Err(ProtocolCallError::Invalid(format!(
                "conflict.{side}_version.timestamp must be a number"
            )));
        }
        let timestamp = ffi::lua_tonumber(state, -1);
        let text = |name| {
            field(state, keys, op, name);
            let s = raw::string_at(state, -1)
                .map(<[u8]>::to_vec)
                .unwrap_or_default();
            ffi::lua_settop(state, -2);
            s
        };
        let fields = OrderFields {
            timestamp,
            device_id: text(DEVICE_ID),
            op_id: text(ID),
        };
        ffi::lua_settop(state, -2);
        Ok(fields)
    }

    fn key(&self) -> OrderKey<'_> {
        OrderKey {
            timestamp: self.timestamp,
            device_id: std::str::from_utf8(&self.device_id).unwrap_or_default(),
            op_id: std::str::from_utf8(&self.op_id).unwrap_or_default(),
        }
    }
}

/// `resolve_conflict(conflict, strategy)` for every strategy but manual, which
/// the Lua module dispatches itself (it only calls the caller's function).
fn resolve_conflict(
    lua: &Lua,
    (conflict, strategy): (LuaValue, LuaValue),
) -> mlua::Result<MultiValue> {
    let strategy_text = match &strategy {
        LuaValue::String(s) => s.to_str().map(|s| s.to_owned()).unwrap_or_default(),
        other => other.to_string()?,
    };
    let strategy = match ConflictStrategy::parse(&strategy_text) {
        Ok(ConflictStrategy::Manual) => Err(protocol::ProtocolError::ManualNeedsResolver),
        other => other,
    };
    let strategy = match strategy {
        Ok(strategy) => strategy,
        Err(e) => return respond(lua, Ok(Err(e.into()))),
    };
    respond(
        lua,
        raw::with_stack(lua, conflict, |state| unsafe {
            expect_table(state, 1, "resolve_conflict")?;
            let keys = FieldKeys::push(state, FIELDS)?;
            for (name, side) in [(LOCAL_VERSION, "local"), (REMOTE_VERSION, "remote")] {
                if field(state, &keys, 1, name) != ffi::LUA_TTABLE {
                    return Err(ProtocolCallError::Invalid(format!(
                        "conflict.{side}_version must be an operation table"
                    )));
                }
            }
            let top = ffi::lua_gettop(state);
            let (local_op, remote_op) = (top - 1, top);
            ffi::lua_createtable(state, 0, 4);
            let result = ffi::lua_gettop(state);
            match strategy {
                ConflictStrategy::LastWriteWins => {
                    let local = OrderFields::read(state, &keys, local_op, "local")?;
                    let remote = OrderFields::read(state, &keys, remote_op, "remote")?;
                    let (side, op) = match last_write_wins(&local.key(), &remote.key()) {
                        Side::Local => (Side::Local, local_op),
                        Side::Remote => (Side::Remote, remote_op),
                    };
                    raw::push_str(state, side.as_str());
                    set_field(state, &keys, result, WINNER);
                    field(state, &keys, op, DATA);
                    set_field(state, &keys, result, DATA);
                    ffi::lua_pushvalue(state, op);
                    set_field(state, &keys, result, OPERATION);
                }
                ConflictStrategy::AutoMerge => {
                    let local = OrderFields::read(state, &keys, local_op, "local")?;
                    let remote = OrderFields::read(state, &keys, remote_op, "remote")?;
                    let winner = last_write_wins(&local.key(), &remote.key());
                    let data_of = |op, side: &str| -> Result<Option<Value>, ProtocolCallError> {
                        field(state, &keys, op, DATA);
                        let value =
                            raw::to_value(state, -1).map_err(|source| ProtocolCallError::Convert {
                                what: format!("conflict.{side}_version.data"),
                                source,
                            });
                        ffi::lua_settop(state, -2);
                        Ok(Some(value?).filter(|v| !v.is_null()))
                    };
                    let merged = protocol::merge(
                        None,
                        data_of(local_op, "local")?.as_ref(),
                        data_of(remote_op, "remote")?.as_ref(),
                        winner,
                    );
                    raw::push_str(state, "merged");
                    set_field(state, &keys, result, WINNER);
                    match &merged {
                        Some(value) => raw::push_value(state, value)?,
                        None => ffi::lua_pushnil(state),
                    }
                    let merged_data = ffi::lua_gettop(state);
                    ffi::lua_pushvalue(state, merged_data);
                    set_field(state, &keys, result, DATA);
                    ffi::lua_createtable(state, 0, 5);
                    let op = ffi::lua_gettop(state);
                    let op_type = if merged.is_some() {
                        OpType::Update
                    } else {
                        OpType::Delete
                    };
                    raw::push_str(state, op_type.as_str());
                    set_field(state, &keys, op, TYPE);
                    field(state, &keys, 1, STORY_ID);
                    set_field(state, &keys, op, STORY_ID);
                    ffi::lua_pushvalue(state, merged_data);
                    set_field(state, &keys, op, DATA);
                    ffi::lua_pushnumber(state, local.timestamp.max(remote.timestamp));
                    set_field(state, &keys, op, TIMESTAMP);
                    raw::push_str(state, "merged");
                    set_field(state, &keys, op, DEVICE_ID);
                    set_field(state, &keys, result, OPERATION);
                    ffi::lua_settop(state, result);
                }
                ConflictStrategy::KeepBoth => {
                    if field(state, &keys, 1, STORY_ID) != ffi::LUA_TSTRING {
                        return Err(ProtocolCallError::Invalid(
                            "conflict.story_id must be a string".into(),
                        ));
                    }
                    let story_id = String::from_utf8_lossy(raw::bytes(state, -1)).into_owned();
                    ffi::lua_settop(state, -2);
                    let op_id = |op| {
                        field(state, &keys, op, ID);
                        let id = raw::string_at(state, -1)
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .unwrap_or_default();
                        ffi::lua_settop(state, -2);
                        id
                    };
                    let (local_id, remote_id) =
                        protocol::keep_both_ids(&story_id, &op_id(local_op), &op_id(remote_op));
                    raw::push_str(state, "both");
                    set_field(state, &keys, result, WINNER);
                    for (copy_id, op, source, slot) in [
                        (local_id, local_op, Side::Local, LOCAL_COPY),
                        (remote_id, remote_op, Side::Remote, REMOTE_COPY),
                    ] {
                        ffi::lua_createtable(state, 0, 3);
                        let copy = ffi::lua_gettop(state);
                        raw::push_str(state, &copy_id);
                        set_field(state, &keys, copy, STORY_ID);
                        field(state, &keys, op, DATA);
                        set_field(state, &keys, copy, DATA);
                        ffi::lua_createtable(state, 0, 2);
                        raw::push_str(state, &story_id);
                        set_field(state, &keys, copy + 1, ORIGINAL_ID);
                        raw::push_str(state, source.as_str());
                        set_field(state, &keys, copy + 1, SOURCE);
                        set_field(state, &keys, copy, METADATA);
                        set_field(state, &keys, result, slot);
                    }
                }
                ConflictStrategy::Manual => unreachable!("manual is dispatched by the Lua module"),
            }
            raw::return_top(state);
            Ok(())
        }),
    )
}

/// The story id key at `idx` of the state map called `name`.
unsafe fn story_id_key<'a>(
    state: State,
    idx: c_int,
    name: &str,
) -> Result<&'a [u8], ProtocolCallError> {
    // The key stays referenced by the state table the caller passed in.
    raw::string_at(state, idx).ok_or_else(|| {
        ProtocolCallError::Invalid(format!(
            "{name} keys must be story id strings, got a {}",
            raw::type_name(state, idx)
        ))
    })
}

/// `generate_delta(old_state, new_state)`: operations in story-id order.
fn generate_delta(lua: &Lua, (old, new): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    respond(
        lua,
        raw::with_stack(lua, (old, new), |state| unsafe {
            expect_table(state, 1, "generate_delta")?;
            expect_table(state, 2, "generate_delta")?;
            let keys = FieldKeys::push(state, FIELDS)?;
            let base = ffi::lua_gettop(state);
            let (key, new_story, old_story) = (base + 1, base + 2, base + 3);
            // Walking the tables themselves keeps ids as Lua strings: no copies, no re-interning.
            let mut changes = Vec::new();
            ffi::lua_pushnil(state);
            while ffi::lua_next(state, 2) != 0 {
                let id = story_id_key(state, key, "new_state")?;
                ffi::lua_pushvalue(state, key);
                if ffi::lua_rawget(state, 1) == ffi::LUA_TNIL {
                    changes.push((id, OpType::Create));
                } else if !raw::deep_equal(state, old_story, new_story).map_err(|kind| {
                    ProtocolCallError::Convert {
                        what: format!("comparing story \"{}\"", String::from_utf8_lossy(id)),
                        source: ConvertError::new(kind),
                    }
                })? {
                    changes.push((id, OpType::Update));
                }
                ffi::lua_settop(state, key);
            }
            ffi::lua_pushnil(state);
            while ffi::lua_next(state, 1) != 0 {
                let id = story_id_key(state, key, "old_state")?;
                ffi::lua_pushvalue(state, key);
                if ffi::lua_rawget(state, 2) == ffi::LUA_TNIL {
                    changes.push((id, OpType::Delete));
                }
                ffi::lua_settop(state, key);
            }
            changes.sort_unstable_by_key(|&(id, _)| id);
            for kind in [OpType::Create, OpType::Update, OpType::Delete] {
                raw::push_str(state, kind.as_str());
            }
            let type_slot = |kind: OpType| match kind {
                OpType::Create => base + 1,
                OpType::Update => base + 2,
                _ => base + 3,
            };
            ffi::lua_createtable(state, changes.len() as c_int, 0);
            let out = ffi::lua_gettop(state);
            for (n, &(id, kind)) in changes.iter().enumerate() {
                raw::push_bytes(state, id);
                let story_id = ffi::lua_gettop(state);
                let data = if kind == OpType::Delete {
                    0
                } else {
                    ffi::lua_pushvalue(state, story_id);
                    ffi::lua_rawget(state, 2);
                    ffi::lua_gettop(state)
                };
                push_operation(state, &keys, type_slot(kind), story_id, data, 0);
                ffi::lua_rawseti(state, out, (n + 1) as _);
                ffi::lua_settop(state, out);
            }
            raw::return_top(state);
            Ok(())
        }),
    )
}

/// `apply_delta(current_state, delta_ops)`: a new state table; inputs are not modified.
fn apply_delta(lua: &Lua, (current, delta): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    respond(
        lua,
        raw::with_stack(lua, (current, delta), |state| unsafe {
            expect_table(state, 1, "apply_delta")?;
            expect_table(state, 2, "apply_delta")?;
            let keys = FieldKeys::push(state, FIELDS)?;
            ffi::lua_createtable(state, 0, raw::entry_count(state, 1) as c_int);
            let out = ffi::lua_gettop(state);
            raw::copy_entries(state, 1, out)?;
            for i in 1..=ffi::lua_rawlen(state, 2) {
                if ffi::lua_rawgeti(state, 2, i as _) != ffi::LUA_TTABLE {
                    return Err(ProtocolCallError::Invalid(format!(
                        "delta_ops[{i}] is not an operation table"
                    )));
                }
                let op = ffi::lua_gettop(state);
                field(state, &keys, op, TYPE);
                let op_type = raw::string_at(state, -1)
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(OpType::parse);
                if field(state, &keys, op, STORY_ID) == ffi::LUA_TNIL {
                    return Err(ProtocolCallError::Invalid(format!(
                        "delta_ops[{i}].story_id is missing"
                    )));
                }
                let story_id = ffi::lua_gettop(state);
                match op_type {
                    Some(OpType::Create | OpType::Update) => {
                        ffi::lua_pushvalue(state, story_id);
                        field(state, &keys, op, DATA);
                        ffi::lua_rawset(state, out);
                    }
                    Some(OpType::Delete) => {
                        ffi::lua_pushvalue(state, story_id);
                        ffi::lua_pushnil(state);
                        ffi::lua_rawset(state, out);
                    }
                    Some(OpType::MetadataUpdate) => {
                        ffi::lua_pushvalue(state, story_id);
                        if ffi::lua_rawget(state, out) == ffi::LUA_TTABLE {
                            let story = ffi::lua_gettop(state);
                            ffi::lua_createtable(
                                state,
                                0,
                                raw::entry_count(state, story) as c_int + 1,
                            );
                            let copy = ffi::lua_gettop(state);
                            raw::copy_entries(state, story, copy)?;
                            field(state, &keys, op, DATA);
                            set_field(state, &keys, copy, METADATA);
                            ffi::lua_pushvalue(state, story_id);
                            ffi::lua_pushvalue(state, copy);
                            ffi::lua_rawset(state, out);
                        }
                    }
                    None => {}
                }
                ffi::lua_settop(state, out);
            }
            raw::return_top(state);
            Ok(())
        }),
    )
}

/// A version vector held in a Lua table on the stack.
struct LuaVersions {
    state: State,
    table: c_int,
}

impl Versions for LuaVersions {
    type Error = ProtocolCallError;

    fn try_for_each(&self, mut f: impl FnMut(&[u8], i64) -> CallResult) -> CallResult {
        unsafe {
            raw::ensure_stack(self.state, 4)?;
            ffi::lua_pushnil(self.state);
            while ffi::lua_next(self.state, self.table) != 0 {
                let entry = version_entry(self.state);
                let outcome = entry.and_then(|(device, version)| f(device, version));
                if outcome.is_err() {
                    ffi::lua_settop(self.state, -3);
                    return outcome;
                }
                ffi::lua_settop(self.state, -2);
            }
            Ok(())
        }
    }

    fn get(&self, device: &[u8]) -> Result<i64, ProtocolCallError> {
        unsafe {
            raw::ensure_stack(self.state, 2)?;
            raw::push_bytes(self.state, device);
            ffi::lua_rawget(self.state, self.table);
            let version = match ffi::lua_type(self.state, -1) {
                ffi::LUA_TNIL => Ok(0),
                _ => raw::integer_at(self.state, -1).ok_or_else(|| bad_version(device)),
            };
            ffi::lua_settop(self.state, -2);
            version
        }
    }
}

fn bad_version(device: &[u8]) -> ProtocolCallError {
    ProtocolCallError::Invalid(format!(
        "version for device \"{}\" must be an integer",
        String::from_utf8_lossy(device)
    ))
}

/// The `(device, version)` entry at the top of a `lua_next` loop.
unsafe fn version_entry<'a>(state: State) -> Result<(&'a [u8], i64), ProtocolCallError> {
    let Some(device) = raw::string_at(state, -2) else {
        return Err(ProtocolCallError::Invalid(format!(
            "version vector keys must be device id strings, got a {}",
            raw::type_name(state, -2)
        )));
    };
    let version = raw::integer_at(state, -1).ok_or_else(|| bad_version(device))?;
    Ok((device, version))
}

/// `compare_version_vectors(v1, v2)` → `"equal"`, `"before"`, `"after"` or `"concurrent"`.
fn compare_version_vectors(lua: &Lua, (v1, v2): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    respond(
        lua,
        raw::with_stack(lua, (v1, v2), |state| unsafe {
            expect_table(state, 1, "compare_version_vectors")?;
            expect_table(state, 2, "compare_version_vectors")?;
            let a = LuaVersions { state, table: 1 };
            let b = LuaVersions { state, table: 2 };
            let causality = version_vector::compare(&a, &b)?;
            ffi::lua_settop(state, 0);
            raw::push_str(state, causality.as_str());
            Ok(())
        }),
    )
}

/// `merge_version_vectors(v1, v2)` → a new vector, the entry-wise maximum.
fn merge_version_vectors(lua: &Lua, (v1, v2): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    respond(
        lua,
        raw::with_stack(lua, (v1, v2), |state| unsafe {
            expect_table(state, 1, "merge_version_vectors")?;
            expect_table(state, 2, "merge_version_vectors")?;
            let a = LuaVersions { state, table: 1 };
            a.try_for_each(|_, _| Ok(()))?;
            ffi::lua_createtable(state, 0, raw::entry_count(state, 1) as c_int);
            let out = ffi::lua_gettop(state);
            raw::copy_entries(state, 1, out)?;
            version_vector::merge_raises(
                &a,
                &LuaVersions { state, table: 2 },
                |device, version| {
                    raw::push_bytes(state, device);
                    raw::push_int(state, version);
                    ffi::lua_rawset(state, out);
                    Ok(())
                },
            )?;
            raw::return_top(state);
            Ok(())
        }),
    )
}

/// `update_version_vector(vector, device_id, version)` → the same vector.
fn update_version_vector(
    _: &Lua,
    (vector, device_id, version): (Table, LuaValue, LuaValue),
) -> mlua::Result<Table> {
    vector.raw_set(device_id, version)?;
    Ok(vector)
}

/// The protocol module table: functions and constants.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    raw::with_stack(lua, (), |state| unsafe {
        raw::probe_interned_length(state)
    })?
    .map_err(mlua::Error::external)?;
    let exports = lua.create_table()?;
    exports.set("create_operation", lua.create_function(create_operation)?)?;
    exports.set("detect_conflicts", lua.create_function(detect_conflicts)?)?;
    exports.set("resolve_conflict", lua.create_function(resolve_conflict)?)?;
    exports.set("generate_delta", lua.create_function(generate_delta)?)?;
    exports.set("apply_delta", lua.create_function(apply_delta)?)?;
    exports.set(
        "create_version_vector",
        lua.create_function(|lua, ()| lua.create_table())?,
    )?;
    exports.set(
        "update_version_vector",
        lua.create_function(update_version_vector)?,
    )?;
    exports.set(
        "compare_version_vectors",
        lua.create_function(compare_version_vectors)?,
    )?;
    exports.set(
        "merge_version_vectors",
        lua.create_function(merge_version_vectors)?,
    )?;
    let op_types = lua.create_table()?;
    for t in OpType::ALL {
        op_types.set(t.constant_name(), t.as_str())?;
    }
    exports.set("OperationType", op_types)?;
    let strategies = lua.create_table()?;
    for s in ConflictStrategy::ALL {
        strategies.set(s.constant_name(), s.as_str())?;
    }
    exports.set("ConflictStrategy", strategies)?;
    Ok(exports)
}
