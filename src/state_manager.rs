//! `whisker.storage.sync.state_manager` for Lua: [`StateManager`] over the
//! storage backend the caller hands in.
//!
//! The store adapter calls only `storage_service.backend:load(key)` and
//! `:save(key, table, {})`, plus `:delete(key)` when the backend has a
//! `delete` function. The Lua module (`lua/whisker/storage/sync/state_manager.lua`)
//! keeps the manager in its instance's `_native` field; Rust code reaches it
//! with [`state_manager_of`].

use std::cell::{RefCell, RefMut};
use std::rc::Rc;

use mlua::{
    AnyUserData, Function, Lua, MultiValue, Table, UserData, UserDataMethods, Value as LuaValue,
};
use sync_core::protocol::now_seconds;
use sync_core::state::{StateError, StateManager, StateStore, StoreError};
use sync_core::value::{Map, Value};

use crate::values::{from_lua, integer, to_lua};

/// The storage backend of a Lua StorageService, as a [`StateStore`].
pub(crate) struct LuaStore {
    storage: Table,
}

/// The message of a Lua error raised by a backend call, without mlua's decoration.
pub(crate) fn lua_error_message(error: &mlua::Error) -> String {
    match error {
        mlua::Error::RuntimeError(message) => message.clone(),
        mlua::Error::CallbackError { cause, .. } => lua_error_message(cause),
        mlua::Error::WithContext { cause, .. } => lua_error_message(cause),
        other => other.to_string(),
    }
}

impl LuaStore {
    /// A store over `storage.backend`.
    pub(crate) fn new(storage: Table) -> Self {
        LuaStore { storage }
    }

    /// The Lua state and `storage.backend`, looked up at call time.
    fn backend(&self) -> Result<(Lua, Table), StoreError> {
        let lua = self
            .storage
            .weak_lua()
            .try_upgrade()
            .ok_or_else(|| StoreError("the Lua state is closed".to_owned()))?;
        match self.storage.get::<LuaValue>("backend") {
            Ok(LuaValue::Table(backend)) => Ok((lua, backend)),
            Ok(_) => Err(StoreError(
                "storage_service.backend is not a table".to_owned(),
            )),
            Err(e) => Err(StoreError(lua_error_message(&e))),
        }
    }

    fn method(backend: &Table, name: &str) -> Result<Option<Function>, StoreError> {
        match backend.get::<LuaValue>(name) {
            Ok(LuaValue::Function(f)) => Ok(Some(f)),
            Ok(_) => Ok(None),
            Err(e) => Err(StoreError(lua_error_message(&e))),
        }
    }

    fn call(
        backend: &Table,
        name: &str,
        args: impl mlua::IntoLuaMulti,
    ) -> Result<(LuaValue, LuaValue), StoreError> {
        let f = Self::method(backend, name)?
            .ok_or_else(|| StoreError(format!("storage backend has no `{name}` method")))?;
        f.call::<(LuaValue, LuaValue)>(args)
            .map_err(|e| StoreError(format!("backend:{name} failed: {}", lua_error_message(&e))))
    }
}

/// A backend's `false, message` (or `nil, message`) as an error.
fn refused(ok: &LuaValue, message: &LuaValue, name: &str) -> Option<StoreError> {
    let failed = matches!(ok, LuaValue::Boolean(false))
        || (ok.is_nil() && !message.is_nil() && !matches!(message, LuaValue::Boolean(_)));
    failed.then(|| {
        let detail = match message {
            LuaValue::String(s) => s.to_string_lossy(),
            _ => "no reason given".to_owned(),
        };
        StoreError(format!("backend:{name} failed: {detail}"))
    })
}

fn is_not_found(message: &LuaValue) -> bool {
    match message {
        LuaValue::String(s) => s.to_string_lossy().to_lowercase().contains("not found"),
        _ => true,
    }
}

impl StateStore for LuaStore {
    fn load(&mut self, key: &str) -> Result<Option<Value>, StoreError> {
        let (lua, backend) = self.backend()?;
        let (value, message) = Self::call(&backend, "load", (backend.clone(), key))?;
        if value.is_nil() {
            return if is_not_found(&message) {
                Ok(None)
            } else {
                Err(refused(&value, &message, "load").unwrap_or_else(|| {
                    StoreError("backend:load failed without a reason".to_owned())
                }))
            };
        }
        match from_lua(&lua, value) {
            Ok(Ok(value)) => Ok(Some(value)),
            Ok(Err(e)) => Err(StoreError(format!("stored value is unreadable: {e}"))),
            Err(e) => Err(StoreError(lua_error_message(&e))),
        }
    }

    fn save(&mut self, key: &str, value: &Value) -> Result<(), StoreError> {
        let (lua, backend) = self.backend()?;
        let table = to_lua(&lua, value).map_err(|e| StoreError(lua_error_message(&e)))?;
        let options = lua
            .create_table()
            .map_err(|e| StoreError(lua_error_message(&e)))?;
        let (ok, message) = Self::call(&backend, "save", (backend.clone(), key, table, options))?;
        match refused(&ok, &message, "save") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn can_delete(&self) -> bool {
        self.backend()
            .and_then(|(_, backend)| Self::method(&backend, "delete"))
            .is_ok_and(|f| f.is_some())
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        let (_, backend) = self.backend()?;
        let (ok, message) = Self::call(&backend, "delete", (backend.clone(), key))?;
        match refused(&ok, &message, "delete") {
            Some(_) if is_not_found(&message) => Ok(()),
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

pub(crate) type LuaStateManager = StateManager<LuaStore>;

/// The native half of a Lua state-manager instance (its `_native` field).
pub(crate) struct StateHandle {
    manager: Rc<RefCell<LuaStateManager>>,
}

impl StateHandle {
    fn get(&self) -> mlua::Result<RefMut<'_, LuaStateManager>> {
        self.manager.try_borrow_mut().map_err(|_| {
            mlua::Error::runtime("the sync state manager is already in use (re-entrant call)")
        })
    }
}

/// The [`StateManager`] behind a Lua state-manager instance (a table made by
/// `SyncStateManager.new`), for Rust code such as the engine binding.
pub(crate) fn state_manager_of(instance: &Table) -> mlua::Result<Rc<RefCell<LuaStateManager>>> {
    let handle: AnyUserData = instance
        .get("_native")
        .map_err(|_| mlua::Error::runtime("not a sync state manager (it has no native state)"))?;
    let handle = handle.borrow::<StateHandle>()?;
    Ok(Rc::clone(&handle.manager))
}

/// `true`, or `false, message` for a change that could not be made durable.
fn outcome(lua: &Lua, result: Result<(), StateError>) -> mlua::Result<MultiValue> {
    match result {
        Ok(()) => Ok(MultiValue::from_iter([LuaValue::Boolean(true)])),
        Err(e) => Ok(MultiValue::from_iter([
            LuaValue::Boolean(false),
            LuaValue::String(lua.create_string(e.to_string())?),
        ])),
    }
}

/// `false, message` for an argument the manager cannot store.
fn rejected(lua: &Lua, message: String) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        LuaValue::Boolean(false),
        LuaValue::String(lua.create_string(message)?),
    ]))
}

/// A whole non-negative number from Lua (rounded; anything else is 0).
fn count(value: &LuaValue) -> u64 {
    match *value {
        LuaValue::Integer(i) => i.max(0) as u64,
        LuaValue::Number(n) if n.is_finite() && n > 0.0 => n.round() as u64,
        _ => 0,
    }
}

/// A table of operations converted, or the reason it cannot be stored.
fn operation_value(lua: &Lua, op: LuaValue) -> mlua::Result<Result<Value, String>> {
    if !op.is_table() {
        return Ok(Err(format!(
            "operation must be a table, got {}",
            op.type_name()
        )));
    }
    Ok(from_lua(lua, op)?.map_err(|e| format!("cannot queue operation: {e}")))
}

fn field<'a>(op: &'a Value, name: &str) -> &'a Value {
    const NULL: &Value = &Value::Null;
    op.get(name).unwrap_or(NULL)
}

fn stats_table(lua: &Lua, manager: &LuaStateManager) -> mlua::Result<Table> {
    let stats = manager.state().stats;
    let table = lua.create_table()?;
    for (name, value) in [
        ("total_syncs", stats.total_syncs),
        ("last_sync_duration_ms", stats.last_sync_duration_ms),
        ("conflicts_resolved", stats.conflicts_resolved),
        ("bandwidth_sent_bytes", stats.bandwidth_sent_bytes),
        ("bandwidth_received_bytes", stats.bandwidth_received_bytes),
    ] {
        table.set(name, integer(i64::try_from(value).unwrap_or(i64::MAX)))?;
    }
    Ok(table)
}

impl UserData for StateHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get_device_id", |_, this, ()| {
            Ok(this.get()?.device_id().to_owned())
        });
        methods.add_method("load_state", |lua, this, ()| {
            to_lua(lua, &this.get()?.to_value())
        });
        methods.add_method("save_state", |lua, this, state: LuaValue| {
            let value = match from_lua(lua, state)? {
                Ok(value) => value,
                Err(e) => return rejected(lua, format!("cannot save state: {e}")),
            };
            let mut manager = this.get()?;
            match manager.replace_with_value(value) {
                Ok(warnings) => {
                    for warning in &warnings {
                        eprintln!("whisker-sync: save_state: {warning}; default used");
                    }
                    outcome(lua, Ok(()))
                }
                Err(e) => outcome(lua, Err(e)),
            }
        });
        methods.add_method("update_last_sync_time", |lua, this, ts: LuaValue| {
            let ts = match ts {
                LuaValue::Integer(i) => crate::values::int64(i),
                LuaValue::Number(n) if n.is_finite() => n.floor() as i64,
                other => {
                    return rejected(
                        lua,
                        format!("timestamp must be a number, got {}", other.type_name()),
                    )
                }
            };
            outcome(lua, this.get()?.update(|s| s.last_sync_time = ts))
        });
        methods.add_method("get_last_sync_time", |_, this, ()| {
            Ok(integer(this.get()?.state().last_sync_time))
        });
        methods.add_method(
            "update_version_vector",
            |lua, this, (device, version): (String, LuaValue)| {
                let version = match from_lua(lua, version)? {
                    Ok(v) => v,
                    Err(e) => return rejected(lua, e.to_string()),
                };
                outcome(
                    lua,
                    this.get()?.update(|s| {
                        if version.is_null() {
                            s.version_vector.remove(&device);
                        } else {
                            s.version_vector.insert(device, version);
                        }
                    }),
                )
            },
        );
        methods.add_method(
            "update_version_vector_batch",
            |lua, this, batch: LuaValue| {
                let entries: Map = match from_lua(lua, batch)? {
                    Ok(Value::Object(map)) => map,
                    Ok(Value::Array(items)) if items.is_empty() => Map::new(),
                    Ok(_) => return rejected(lua, "version vector must be a table".to_owned()),
                    Err(e) => return rejected(lua, e.to_string()),
                };
                outcome(
                    lua,
                    this.get()?.update(|s| s.version_vector.extend(entries)),
                )
            },
        );
        methods.add_method("get_version_vector", |lua, this, ()| {
            let manager = this.get()?;
            let vector = Value::Object(manager.state().version_vector.clone());
            to_lua(lua, &vector).and_then(|v| match v {
                LuaValue::Table(t) => Ok(LuaValue::Table(t)),
                _ => lua.create_table().map(LuaValue::Table),
            })
        });
        methods.add_method("get_device_version", |lua, this, device: String| match this
            .get()?
            .state()
            .version_vector
            .get(&device)
        {
            Some(version) => to_lua(lua, version),
            None => Ok(integer(0)),
        });
        methods.add_method("set_sync_status", |lua, this, status: String| {
            outcome(lua, this.get()?.update(|s| s.sync_status = status))
        });
        methods.add_method("get_sync_status", |_, this, ()| {
            Ok(this.get()?.state().sync_status.clone())
        });
        methods.add_method(
            "queue_operation",
            |lua, this, op: LuaValue| match operation_value(lua, op)? {
                Ok(op) => outcome(lua, this.get()?.queue_values(vec![op])),
                Err(message) => rejected(lua, message),
            },
        );
        methods.add_method("queue_operations_batch", |lua, this, ops: Table| {
            let mut values = Vec::new();
            for op in ops.sequence_values::<LuaValue>() {
                match operation_value(lua, op?)? {
                    Ok(op) => values.push(op),
                    Err(message) => return rejected(lua, message),
                }
            }
            outcome(lua, this.get()?.queue_values(values))
        });
        methods.add_method("get_pending_operations", |lua, this, ()| {
            let manager = this.get()?;
            let list = lua.create_table_with_capacity(manager.pending_count(), 0)?;
            for (i, op) in manager.pending_values().enumerate() {
                list.raw_set(i + 1, to_lua(lua, op)?)?;
            }
            Ok(list)
        });
        methods.add_method("get_pending_count", |_, this, ()| {
            Ok(integer(this.get()?.pending_count() as i64))
        });
        methods.add_method("remove_pending_operation", |lua, this, index: LuaValue| {
            let mut manager = this.get()?;
            let count = manager.pending_count() as u64;
            let position = match index {
                LuaValue::Integer(i) if i >= 1 && (i as u64) <= count => i as usize - 1,
                LuaValue::Number(n) if n >= 1.0 && n.fract() == 0.0 && n as u64 <= count => {
                    n as usize - 1
                }
                _ => return Ok(MultiValue::from_iter([LuaValue::Boolean(false)])),
            };
            outcome(lua, manager.remove_pending(|i, _| i == position).map(drop))
        });
        methods.add_method(
            "remove_pending_operation_by_match",
            |lua, this, op: LuaValue| {
                let wanted = match operation_value(lua, op)? {
                    Ok(op) => op,
                    Err(_) => return Ok(MultiValue::from_iter([LuaValue::Boolean(false)])),
                };
                let mut manager = this.get()?;
                let matches = |candidate: &Value| {
                    ["type", "story_id", "timestamp"]
                        .iter()
                        .all(|name| field(candidate, name) == field(&wanted, name))
                };
                let Some(position) = manager.pending_values().position(matches) else {
                    return Ok(MultiValue::from_iter([LuaValue::Boolean(false)]));
                };
                outcome(lua, manager.remove_pending(|i, _| i == position).map(drop))
            },
        );
        methods.add_method("clear_pending_operations", |lua, this, ()| {
            outcome(lua, this.get()?.clear_pending())
        });
        methods.add_method(
            "record_sync",
            |lua, this, (duration, _operations, conflicts): (LuaValue, LuaValue, LuaValue)| {
                let (duration, conflicts) = (count(&duration), count(&conflicts));
                outcome(
                    lua,
                    this.get()?.update(|s| {
                        s.stats.total_syncs += 1;
                        s.stats.last_sync_duration_ms = duration;
                        s.stats.conflicts_resolved += conflicts;
                    }),
                )
            },
        );
        methods.add_method(
            "record_bandwidth",
            |lua, this, (sent, received): (LuaValue, LuaValue)| {
                let (sent, received) = (count(&sent), count(&received));
                outcome(
                    lua,
                    this.get()?.update(|s| {
                        s.stats.bandwidth_sent_bytes += sent;
                        s.stats.bandwidth_received_bytes += received;
                    }),
                )
            },
        );
        methods.add_method("get_stats", |lua, this, ()| stats_table(lua, &*this.get()?));
        methods.add_method("reset_stats", |lua, this, ()| {
            outcome(lua, this.get()?.reset_stats())
        });
        methods.add_method("record_error", |lua, this, message: LuaValue| {
            let message = match message {
                LuaValue::String(s) => s.to_string_lossy(),
                LuaValue::Nil => "unknown error".to_owned(),
                other => other.to_string()?,
            };
            outcome(lua, this.get()?.record_error(message))
        });
        methods.add_method("clear_error", |lua, this, ()| {
            outcome(lua, this.get()?.clear_error())
        });
        methods.add_method("get_last_error", |lua, this, ()| {
            let manager = this.get()?;
            let Some(error) = &manager.state().last_error else {
                return Ok(LuaValue::Nil);
            };
            let table = lua.create_table()?;
            table.set("message", error.message.as_str())?;
            table.set("timestamp", integer(error.timestamp))?;
            Ok(LuaValue::Table(table))
        });
        methods.add_method("reset", |lua, this, ()| outcome(lua, this.get()?.reset()));
        methods.add_method("get_time_since_last_sync", |_, this, ()| {
            let last = this.get()?.state().last_sync_time;
            Ok(integer(if last == 0 { -1 } else { now_seconds() - last }))
        });
        methods.add_method("warnings", |lua, this, ()| {
            lua.create_sequence_from(this.get()?.warnings().iter().cloned())
        });
    }
}

/// `open(storage_service)` → the native state, or `nil, message`.
fn open(lua: &Lua, storage: LuaValue) -> mlua::Result<MultiValue> {
    let LuaValue::Table(storage) = storage else {
        return crate::values::failure(lua, "storage_service is required");
    };
    if !matches!(storage.get::<LuaValue>("backend")?, LuaValue::Table(_)) {
        return crate::values::failure(lua, "storage_service.backend is required");
    }
    match StateManager::open(LuaStore { storage }) {
        Ok(manager) => {
            for warning in manager.warnings() {
                eprintln!("whisker-sync: {warning}");
            }
            let handle = lua.create_userdata(StateHandle {
                manager: Rc::new(RefCell::new(manager)),
            })?;
            crate::values::success(lua, handle)
        }
        Err(e) => crate::values::failure(lua, e.to_string()),
    }
}

/// The state-manager part of the native module.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("open", lua.create_function(open)?)?;
    exports.set("state_key", sync_core::state::STATE_KEY)?;
    Ok(exports)
}
