//! `whisker.storage.sync.engine` for Lua: [`Engine`] driven from the Lua
//! thread, with the storage, transport and listeners the caller handed in.
//!
//! The Lua module (`lua/whisker/storage/sync/engine.lua`) makes the instance
//! table; the functions here take that table as `self` and reach the native
//! half through its `_native` field. Collaborators are looked up on the
//! instance at call time (`self._storage`, `self._transport`,
//! `self._conflict_resolver`), so replacing them, or monkeypatching their
//! methods, takes effect on the next call.
//!
//! Storage methods are resolved one by one: `list_stories`/`load_story`/
//! `save_story`/`delete_story` when the storage has that exact method (the
//! real StorageService), else `list`/`load`/`save`/`delete` (the old specs'
//! mocks). A `nil` return from a save or delete is success.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::ffi::c_int;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{ffi, AnyUserData, Function, Lua, MultiValue, Table, UserData, Value as LuaValue};
use sync_core::engine::{
    content_hash, needs_content, write_outcome, Conflict, ContentSource, Decision, Engine,
    EngineConfig, FetchPage, Host, HostError, Outcome, Progress, PushReply, Storage, StoryEntry,
    StoryFilter, SyncError, SyncReport, Transport,
};
use sync_core::patch::{self, PATCH};
use sync_core::protocol::{now_seconds, ConflictStrategy, ConflictType, OpType, Operation};
use sync_core::state::{status, StateManager, TransientStore};
use sync_core::value::Value;
use sync_core::wire::ServerConflict;

use crate::protocol::{
    set_field, FieldKeys, BASE_VERSION, DATA, DEVICE_ID, FIELDS, ID, METADATA, STORY_ID, TIMESTAMP,
    TYPE, VERSION,
};
use crate::raw;
use crate::state_manager::{lua_error_message, state_manager_of, LuaStateManager, LuaStore};
use crate::story_hash;
use crate::values::{failure, from_lua, integer, to_lua};

/// Where an engine keeps its state.
enum EngineState {
    /// A state manager's, shared with its Lua object (the CLI passes one), or
    /// one the engine opened on the storage's backend.
    Persistent(Rc<RefCell<LuaStateManager>>),
    /// No backend to persist into (the old engine spec's mock storage).
    Memory(Box<StateManager<TransientStore>>),
}

/// Flags storage and transport event listeners set for the engine; they may
/// fire while a sync holds the engine, so they live apart from it.
#[derive(Default)]
struct Signals {
    dirty: RefCell<BTreeSet<String>>,
    cleared: Cell<bool>,
    /// Set while the engine writes to storage: the events that causes are its own.
    applying: Cell<bool>,
    remote_change: Cell<bool>,
}

/// The native half of a Lua engine instance (its `_native` field).
struct EngineHandle {
    engine: RefCell<Engine>,
    state: RefCell<EngineState>,
    signals: Rc<Signals>,
    next_sync: Cell<Option<Instant>>,
    failures: Cell<u32>,
    /// The transport whose `remote_change` events this engine listens to.
    listening_to: Cell<Option<usize>>,
}

impl UserData for EngineHandle {}

fn handle_of(this: &Table) -> mlua::Result<mlua::UserDataRef<EngineHandle>> {
    this.get::<AnyUserData>("_native")
        .map_err(|_| mlua::Error::runtime("not a sync engine (it has no native part)"))?
        .borrow::<EngineHandle>()
}

thread_local! {
    /// Set when a Lua callback failed because the interpreter was interrupted
    /// (Ctrl-C raises "interrupted!" from a hook in whatever Lua code runs).
    static INTERRUPTED: Cell<bool> = const { Cell::new(false) };
}

/// The message of a failed Lua call; notes an interrupt so that the engine
/// stops and re-raises it instead of reporting a failed sync.
fn callback_message(error: &mlua::Error) -> String {
    let message = lua_error_message(error);
    if message.contains("interrupted!") {
        INTERRUPTED.set(true);
    }
    message
}

/// Raises "interrupted!" if a callback was interrupted since the last check.
fn take_interrupt() -> mlua::Result<()> {
    if INTERRUPTED.replace(false) {
        return Err(mlua::Error::runtime("interrupted!"));
    }
    Ok(())
}

/// A Lua function at `table[name]`, if there is one.
fn method(table: &Table, name: &str) -> Option<Function> {
    match table.get::<LuaValue>(name) {
        Ok(LuaValue::Function(f)) => Some(f),
        _ => None,
    }
}

/// A failing call's `false, message` / `nil, message`, if it is one.
fn refusal(values: &MultiValue) -> Option<String> {
    let mut iter = values.iter();
    let first = iter.next().unwrap_or(&LuaValue::Nil);
    let message = iter.next().unwrap_or(&LuaValue::Nil);
    let failed = matches!(first, LuaValue::Boolean(false)) || (first.is_nil() && !message.is_nil());
    failed.then(|| match message {
        LuaValue::String(s) => s.to_string_lossy(),
        LuaValue::Nil => "no reason given".to_owned(),
        other => other
            .to_string()
            .unwrap_or_else(|_| other.type_name().to_owned()),
    })
}

/// A value's type as Lua's `type()` names it, with an article ("a number").
fn a_lua_type(value: &LuaValue) -> &'static str {
    match value {
        LuaValue::Nil => "nil",
        LuaValue::Boolean(_) => "a boolean",
        LuaValue::Integer(_) | LuaValue::Number(_) => "a number",
        LuaValue::String(_) => "a string",
        LuaValue::Table(_) => "a table",
        LuaValue::Function(_) => "a function",
        LuaValue::Thread(_) => "a thread",
        _ => "a userdata",
    }
}

fn first(values: MultiValue) -> LuaValue {
    values.into_iter().next().unwrap_or(LuaValue::Nil)
}

/// An operation as a new Lua table (the fields of its JSON form).
fn operation_table(lua: &Lua, op: &Operation) -> mlua::Result<Table> {
    let pushed = raw::with_stack(lua, (), |state| unsafe {
        let keys = FieldKeys::push(state, FIELDS)?;
        push_operation_table(state, &keys, op, 0)?;
        raw::return_top(state);
        Ok::<(), raw::ConvertErrorKind>(())
    })?;
    built_table(pushed)
}

/// The operations as a list of new Lua tables, built in one protected call.
/// `data[i]`, when set (the storage's own story table), is the content of
/// operation `i` (from 1); a create or update whose content is missing goes
/// out as a delete.
fn operation_list(lua: &Lua, ops: &[Operation], data: Table) -> mlua::Result<Table> {
    let pushed = raw::with_stack(lua, data, |state| unsafe {
        let keys = FieldKeys::push(state, FIELDS)?;
        ffi::lua_createtable(state, ops.len() as c_int, 0);
        let list = ffi::lua_gettop(state);
        for (i, op) in ops.iter().enumerate() {
            let n = (i + 1) as ffi::lua_Integer;
            let has_content = ffi::lua_rawgeti(state, 1, n) != ffi::LUA_TNIL;
            let content = if has_content { list + 1 } else { 0 };
            push_operation_table(state, &keys, op, content)?;
            if needs_content(op) && !has_content {
                raw::push_str(state, OpType::Delete.as_str());
                set_field(state, &keys, list + 2, TYPE);
            }
            ffi::lua_rawseti(state, list, n);
            ffi::lua_settop(state, list);
        }
        raw::return_top(state);
        Ok::<(), raw::ConvertErrorKind>(())
    })?;
    built_table(pushed)
}

fn built_table(pushed: Result<MultiValue, raw::ConvertErrorKind>) -> mlua::Result<Table> {
    match pushed.map(|values| values.into_iter().next()) {
        Ok(Some(LuaValue::Table(table))) => Ok(table),
        Ok(_) => Err(mlua::Error::runtime("operation table was not built")),
        Err(kind) => Err(mlua::Error::runtime(kind.to_string())),
    }
}

/// Pushes `op` as a table, with the value at `data` (unless 0) as its data.
/// Built with the raw API; field names come from `keys`.
unsafe fn push_operation_table(
    state: raw::State,
    keys: &FieldKeys,
    op: &Operation,
    data: c_int,
) -> Result<(), raw::ConvertErrorKind> {
    raw::ensure_stack(state, 4)?;
    ffi::lua_createtable(state, 0, 8 + op.extra.len() as c_int);
    let table = ffi::lua_gettop(state);
    for (key, value) in &op.extra {
        raw::push_str(state, key);
        raw::push_value(state, value)?;
        ffi::lua_rawset(state, table);
    }
    raw::push_str(state, &op.id);
    set_field(state, keys, table, ID);
    raw::push_str(state, op.op_type.as_str());
    set_field(state, keys, table, TYPE);
    raw::push_str(state, &op.story_id);
    set_field(state, keys, table, STORY_ID);
    if data != 0 {
        ffi::lua_pushvalue(state, data);
        set_field(state, keys, table, DATA);
    } else if let Some(value) = &op.data {
        raw::push_value(state, value)?;
        set_field(state, keys, table, DATA);
    }
    ffi::lua_createtable(state, 0, op.metadata.len() as c_int);
    for (key, value) in &op.metadata {
        raw::push_str(state, key);
        raw::push_value(state, value)?;
        ffi::lua_rawset(state, -3);
    }
    set_field(state, keys, table, METADATA);
    raw::push_int(state, op.timestamp);
    set_field(state, keys, table, TIMESTAMP);
    raw::push_str(state, &op.device_id);
    set_field(state, keys, table, DEVICE_ID);
    for (name, version) in [(BASE_VERSION, op.base_version), (VERSION, op.version)] {
        if let Some(version) = version {
            raw::push_int(state, i64::try_from(version).unwrap_or(i64::MAX));
            set_field(state, keys, table, name);
        }
    }
    Ok(())
}

/// A storage method: the first of two names the storage has.
type StorageMethod = (Function, &'static str);

/// Finds the first of `names` the storage has.
fn storage_method(storage: &Table, names: [&'static str; 2]) -> Result<StorageMethod, HostError> {
    names
        .into_iter()
        .find_map(|name| method(storage, name).map(|f| (f, name)))
        .ok_or_else(|| HostError(format!("storage has neither {} nor {}", names[0], names[1])))
}

/// Calls a storage method with the storage as `self`.
fn call_method(
    storage: &Table,
    (f, name): &StorageMethod,
    args: impl mlua::IntoLuaMulti,
) -> Result<MultiValue, HostError> {
    f.call::<MultiValue>((storage.clone(), args)).map_err(|e| {
        HostError(format!(
            "storage {name} raised an error: {}",
            callback_message(&e)
        ))
    })
}

/// Calls the first of `names` the storage has, as a method; returns its
/// results and the name called.
fn call_storage(
    storage: &Table,
    names: [&'static str; 2],
    args: impl mlua::IntoLuaMulti,
) -> Result<(MultiValue, &'static str), HostError> {
    let method = storage_method(storage, names)?;
    Ok((call_method(storage, &method, args)?, method.1))
}

const LOAD: [&str; 2] = ["load_story", "load"];

/// A story as the storage holds it (its Lua table, or nil when missing),
/// through its load method.
fn load_with(storage: &Table, load: &StorageMethod, id: &str) -> Result<Option<Table>, HostError> {
    match first(call_method(storage, load, id.to_owned())?) {
        LuaValue::Nil => Ok(None),
        LuaValue::Table(story) => Ok(Some(story)),
        other => Err(HostError(format!(
            "storage {}('{id}') returned {}, not a story table",
            load.1,
            a_lua_type(&other)
        ))),
    }
}

/// A story as the storage holds it: its Lua table, or nil when missing.
fn load_story_table(storage: &Table, id: &str) -> Result<Option<Table>, HostError> {
    load_with(storage, &storage_method(storage, LOAD)?, id)
}

/// Stories hashed during one sync, by id: the very table hashed, so that
/// pushing the story sends the content its queued hash was taken from,
/// without loading it again.
type HashedStories = Rc<RefCell<HashMap<String, Table>>>;

/// Reads the story list at stack index 1 (one protected call for the whole
/// list, not one per field). Stops at the first entry without an id, giving
/// its position and what it is.
unsafe fn read_story_entries(
    state: raw::State,
    stories: &mut Vec<StoryEntry>,
    without_id: &mut Option<(usize, String)>,
) -> Result<(), raw::ConvertErrorKind> {
    raw::ensure_stack(state, 4)?;
    let (entry, field) = (2, 3);
    let text_at = |idx| raw::string_at(state, idx).map(|s| String::from_utf8_lossy(s).into_owned());
    for i in 1.. {
        match ffi::lua_rawgeti(state, 1, i as _) {
            ffi::LUA_TNIL => break,
            ffi::LUA_TTABLE => {}
            _ => {
                *without_id = Some((i, format!("a {}", raw::type_name(state, entry))));
                break;
            }
        }
        ffi::lua_getfield(state, entry, c"id".as_ptr());
        let mut id = text_at(field);
        ffi::lua_settop(state, entry);
        if id.is_none() {
            ffi::lua_getfield(state, entry, c"key".as_ptr());
            id = text_at(field);
            ffi::lua_settop(state, entry);
        }
        let Some(id) = id else {
            *without_id = Some((i, "a table".to_owned()));
            break;
        };
        ffi::lua_getfield(state, entry, c"updated_at".as_ptr());
        let updated_at = if ffi::lua_type(state, field) == ffi::LUA_TNUMBER {
            match raw::number_at(state, field) {
                Value::Int(t) => Some(t),
                Value::Float(t) if t.is_finite() => Some(t.floor() as i64),
                _ => None,
            }
        } else {
            None
        };
        ffi::lua_settop(state, entry);
        // whisker-core's StorageService lists each story's tags.
        let tags =
            (ffi::lua_getfield(state, entry, c"tags".as_ptr()) == ffi::LUA_TTABLE).then(|| {
                let mut tags = Vec::new();
                for t in 1.. {
                    if ffi::lua_rawgeti(state, field, t) == ffi::LUA_TNIL {
                        break;
                    }
                    tags.extend(text_at(field + 1));
                    ffi::lua_settop(state, field);
                }
                tags
            });
        ffi::lua_settop(state, 1);
        stories.push(StoryEntry {
            id,
            updated_at,
            tags,
        });
    }
    Ok(())
}

/// The storage handed to the engine, as the engine's [`Storage`].
struct LuaStorage {
    lua: Lua,
    storage: Option<Table>,
    signals: Rc<Signals>,
    hashed: HashedStories,
    /// Bytes of JSON of the stories hashed this sync (hashing writes it all).
    json_lens: HashMap<String, usize>,
    /// The storage's load method, looked up once per sync: a sync loads
    /// every story it hashes.
    load_method: RefCell<Option<StorageMethod>>,
}

/// The table in `this[key]`, or `None` when the field holds anything else.
fn table_field(this: &Table, key: &str) -> mlua::Result<Option<Table>> {
    Ok(match this.get::<LuaValue>(key)? {
        LuaValue::Table(t) => Some(t),
        _ => None,
    })
}

impl LuaStorage {
    fn new(lua: &Lua, storage: Option<Table>, handle: &EngineHandle) -> Self {
        LuaStorage {
            lua: lua.clone(),
            storage,
            signals: Rc::clone(&handle.signals),
            hashed: HashedStories::default(),
            json_lens: HashMap::new(),
            load_method: RefCell::default(),
        }
    }

    /// The story `id` as the storage holds it (see [`load_with`]).
    fn load_table(&self, storage: &Table, id: &str) -> Result<Option<Table>, HostError> {
        let cached = self.load_method.borrow().clone();
        let load = match cached {
            Some(load) => load,
            None => self
                .load_method
                .borrow_mut()
                .insert(storage_method(storage, LOAD)?)
                .clone(),
        };
        // No borrow is held while the storage runs: it may call back into Lua.
        load_with(storage, &load, id)
    }

    /// Calls the first of `names` the storage has, as a method.
    fn call(
        &self,
        names: [&'static str; 2],
        args: impl mlua::IntoLuaMulti,
    ) -> Result<(MultiValue, &'static str), HostError> {
        let storage = self
            .storage
            .as_ref()
            .ok_or_else(|| HostError("no storage".into()))?;
        call_storage(storage, names, args)
    }

    /// A write, marked as the engine's own so its events are ignored.
    fn write(
        &self,
        names: [&'static str; 2],
        id: &str,
        extra: Option<LuaValue>,
        ignore_missing: bool,
    ) -> Result<(), HostError> {
        self.signals.applying.set(true);
        let result = match extra {
            Some(value) => self.call(names, (id.to_owned(), value)),
            None => self.call(names, id.to_owned()),
        };
        self.signals.applying.set(false);
        let (values, label) = result?;
        match refusal(&values) {
            Some(reason) if ignore_missing && reason.to_lowercase().contains("not found") => Ok(()),
            Some(reason) => Err(HostError(format!(
                "storage {label}('{id}') failed: {reason}"
            ))),
            None => Ok(()),
        }
    }
}

impl Storage for LuaStorage {
    fn list(&mut self) -> Result<Vec<StoryEntry>, HostError> {
        if self.storage.is_none() {
            return Ok(Vec::new());
        }
        let (values, label) = self.call(["list_stories", "list"], ())?;
        if let Some(reason) = refusal(&values) {
            return Err(HostError(format!("storage {label} failed: {reason}")));
        }
        // Anything but a list of stories is refused: read as "no stories",
        // it would turn every synced story into a delete on every device.
        let entries = match first(values) {
            LuaValue::Table(entries) => entries,
            other => {
                return Err(HostError(format!(
                    "storage {label} returned {}, not a list of stories",
                    a_lua_type(&other)
                )))
            }
        };
        let mut stories = Vec::new();
        let mut without_id = None;
        raw::with_stack(&self.lua, entries, |state| unsafe {
            read_story_entries(state, &mut stories, &mut without_id)
        })
        .map_err(|e| HostError(callback_message(&e)))?
        .map_err(|kind| HostError(kind.to_string()))?;
        if let Some((i, kind)) = without_id {
            return Err(HostError(format!(
                "storage {label} returned an entry without an id (entry {i}: {kind})"
            )));
        }
        Ok(stories)
    }

    fn load(&mut self, id: &str) -> Result<Option<Value>, HostError> {
        let Some(storage) = &self.storage else {
            return Ok(None);
        };
        let Some(story) = self.load_table(storage, id)? else {
            return Ok(None);
        };
        match from_lua(&self.lua, LuaValue::Table(story)) {
            Ok(Ok(value)) => Ok(Some(value)),
            Ok(Err(e)) => Err(HostError(format!("story '{id}' cannot be synced: {e}"))),
            Err(e) => Err(HostError(callback_message(&e))),
        }
    }

    fn hash(&mut self, id: &str) -> Result<Option<String>, HostError> {
        let Some(storage) = &self.storage else {
            return Ok(None);
        };
        let Some(story) = self.load_table(storage, id)? else {
            return Ok(None);
        };
        let mut hash = None;
        let hashed = raw::with_stack(&self.lua, &story, |state| unsafe {
            hash = Some(story_hash::story_hash(state, 1)?);
            ffi::lua_settop(state, 0);
            Ok::<(), story_hash::NotInPlace>(())
        })
        .map_err(|e| HostError(callback_message(&e)))?;
        match (hashed, hash) {
            (Ok(_), Some((hash, json_len))) => {
                self.hashed.borrow_mut().insert(id.to_owned(), story);
                self.json_lens.insert(id.to_owned(), json_len);
                Ok(Some(hash))
            }
            // Unusual content: convert it, which hashes it or says what is wrong.
            _ => Ok(self.load(id)?.map(|story| content_hash(Some(&story)))),
        }
    }

    fn json_len(&mut self, id: &str) -> Result<Option<usize>, HostError> {
        if let Some(len) = self.json_lens.get(id) {
            return Ok(Some(*len));
        }
        Ok(match self.hash(id)? {
            None => None,
            Some(_) => Some(match self.json_lens.get(id) {
                Some(len) => *len,
                // Hashed by conversion: measure the conversion.
                None => self
                    .load(id)?
                    .and_then(|story| patch::json_len(&story))
                    .unwrap_or(0),
            }),
        })
    }

    fn save(&mut self, id: &str, story: &Value) -> Result<(), HostError> {
        self.json_lens.remove(id);
        let table = to_lua(&self.lua, story).map_err(|e| HostError(callback_message(&e)))?;
        self.write(["save_story", "save"], id, Some(table), false)
    }

    fn delete(&mut self, id: &str) -> Result<(), HostError> {
        self.json_lens.remove(id);
        self.write(["delete_story", "delete"], id, None, true)
    }

    fn update_metadata(&mut self, id: &str, metadata: &Value) -> Result<bool, HostError> {
        let Some(storage) = &self.storage else {
            return Ok(false);
        };
        if method(storage, "update_metadata").is_none() {
            return Ok(false);
        }
        let table = to_lua(&self.lua, metadata).map_err(|e| HostError(callback_message(&e)))?;
        self.write(
            ["update_metadata", "update_metadata"],
            id,
            Some(table),
            false,
        )?;
        Ok(true)
    }
}

/// The transport handed to the engine, as the engine's [`Transport`].
struct LuaTransport {
    lua: Lua,
    transport: Table,
    /// The engine's storage: pushed stories are its own tables, not copies.
    storage: Option<Table>,
    /// Tables the storage side hashed this sync (see [`HashedStories`]).
    hashed: HashedStories,
    connected: bool,
}

impl LuaTransport {
    fn call(&self, name: &str, args: impl mlua::IntoLuaMulti) -> Result<LuaValue, HostError> {
        let f = method(&self.transport, name)
            .ok_or_else(|| HostError(format!("transport has no {name} method")))?;
        let values = f
            .call::<MultiValue>((self.transport.clone(), args))
            .map_err(|e| {
                HostError(format!(
                    "transport {name} raised an error: {}",
                    callback_message(&e)
                ))
            })?;
        if let Some(reason) = refusal(&values) {
            return Err(HostError(reason));
        }
        Ok(first(values))
    }

    /// Connects (and authenticates) transports that need it, once per sync.
    fn ensure_connected(&mut self) -> Result<(), HostError> {
        if self.connected {
            return Ok(());
        }
        if let (Some(is_connected), Some(_)) = (
            method(&self.transport, "is_connected"),
            method(&self.transport, "connect"),
        ) {
            let up = is_connected
                .call::<bool>(self.transport.clone())
                .map_err(|e| {
                    HostError(format!(
                        "transport is_connected raised an error: {}",
                        callback_message(&e)
                    ))
                })?;
            if !up {
                self.call("connect", ())
                    .map_err(|e| HostError(format!("cannot connect to the sync server: {e}")))?;
            }
        }
        self.connected = true;
        Ok(())
    }

    /// Payload bytes `(sent, received)` so far, from the transport's own
    /// counters (`get_traffic`); zeros for transports without them.
    fn traffic(&self) -> (u64, u64) {
        let Some(get_traffic) = method(&self.transport, "get_traffic") else {
            return (0, 0);
        };
        match get_traffic.call::<LuaValue>(self.transport.clone()) {
            Ok(LuaValue::Table(t)) => {
                let field = |name| {
                    t.get::<LuaValue>(name)
                        .ok()
                        .as_ref()
                        .and_then(number)
                        .unwrap_or(0)
                };
                (field("sent"), field("received"))
            }
            _ => (0, 0),
        }
    }
}

fn number(value: &LuaValue) -> Option<u64> {
    match *value {
        LuaValue::Integer(i) => u64::try_from(crate::values::int64(i)).ok(),
        LuaValue::Number(n) if n.is_finite() && n >= 0.0 => Some(n.floor() as u64),
        _ => None,
    }
}

impl Transport for LuaTransport {
    fn fetch(
        &mut self,
        device_id: &str,
        since: u64,
        patches: bool,
    ) -> Result<FetchPage, HostError> {
        self.ensure_connected()?;
        let before = self.traffic();
        let args = (device_id.to_owned(), integer(since as i64));
        let result = if patches {
            let options = self
                .lua
                .create_table_from([("patches", true)])
                .map_err(|e| HostError(callback_message(&e)))?;
            self.call("fetch_operations", (args.0, args.1, options))?
        } else {
            self.call("fetch_operations", args)?
        };
        let LuaValue::Table(result) = result else {
            return Err(HostError(format!(
                "transport fetch_operations returned {}, not a result table",
                a_lua_type(&result)
            )));
        };
        let operations = match result.get::<LuaValue>("operations") {
            Ok(LuaValue::Nil) => Vec::new(),
            Ok(LuaValue::Table(list)) => {
                let mut operations = Vec::new();
                for op in list.sequence_values::<LuaValue>() {
                    let op = op.map_err(|e| HostError(callback_message(&e)))?;
                    match from_lua(&self.lua, op) {
                        Ok(Ok(value)) => operations.push(value),
                        Ok(Err(e)) => {
                            return Err(HostError(format!("invalid operation from server: {e}")))
                        }
                        Err(e) => return Err(HostError(callback_message(&e))),
                    }
                }
                operations
            }
            _ => {
                return Err(HostError(
                    "invalid response: operations is not a list".into(),
                ))
            }
        };
        let version = result
            .get::<LuaValue>("version")
            .ok()
            .as_ref()
            .and_then(number)
            .unwrap_or(since);
        let has_more = matches!(
            result.get::<LuaValue>("has_more"),
            Ok(LuaValue::Boolean(true))
        );
        let accepts_patches = match result.get::<LuaValue>("features") {
            Ok(LuaValue::Table(features)) => features.sequence_values::<LuaValue>().flatten().any(
                |f| matches!(f, LuaValue::String(name) if name.as_bytes() == PATCH.as_bytes()),
            ),
            _ => false,
        };
        let after = self.traffic();
        Ok(FetchPage {
            operations,
            version,
            has_more,
            bytes_received: after.1.saturating_sub(before.1),
            accepts_patches,
        })
    }

    fn push(
        &mut self,
        device_id: &str,
        operations: &[Operation],
        content: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError> {
        self.ensure_connected()?;
        let before = self.traffic();
        let lua_error = |e: mlua::Error| HostError(callback_message(&e));
        // The contents first (the storage's Lua runs here), then every
        // operation table in one protected call.
        let contents = self
            .lua
            .create_table_with_capacity(operations.len(), 0)
            .map_err(lua_error)?;
        for (i, op) in operations.iter().enumerate() {
            if !needs_content(op) {
                continue;
            }
            let content = match &self.storage {
                Some(storage) => {
                    // Taken out first: no borrow is held while the storage runs.
                    let hashed = self.hashed.borrow_mut().remove(&op.story_id);
                    match hashed {
                        Some(table) => Some(LuaValue::Table(table)),
                        None => load_story_table(storage, &op.story_id)?.map(LuaValue::Table),
                    }
                }
                None => match content(&op.story_id)? {
                    Some(story) => Some(to_lua(&self.lua, &story).map_err(lua_error)?),
                    None => None,
                },
            };
            if let Some(content) = content {
                contents.raw_set(i + 1, content).map_err(lua_error)?;
            }
        }
        let list = operation_list(&self.lua, operations, contents).map_err(lua_error)?;
        let result = self.call("push_operations", (device_id.to_owned(), list.clone()))?;
        let LuaValue::Table(result) = result else {
            return Err(HostError(format!(
                "transport push_operations returned {}, not a result table",
                a_lua_type(&result)
            )));
        };
        let success = matches!(
            result.get::<LuaValue>("success"),
            Ok(LuaValue::Boolean(true))
        );
        let conflicts = match result.get::<LuaValue>("conflicts") {
            Ok(conflicts @ LuaValue::Table(_)) => match from_lua(&self.lua, conflicts) {
                Ok(Ok(Value::Array(items))) => items.iter().filter_map(server_conflict).collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        // Each operation's server version: from the `accepted` extension, or
        // set on the operation tables themselves by in-process servers.
        let mut accepted = Vec::new();
        if let Ok(LuaValue::Table(list)) = result.get::<LuaValue>("accepted") {
            for entry in list.sequence_values::<Table>().flatten() {
                if let (Ok(id), Some(version)) = (
                    entry.get::<String>("op_id"),
                    entry
                        .get::<LuaValue>("version")
                        .ok()
                        .as_ref()
                        .and_then(number),
                ) {
                    accepted.push((id, version));
                }
            }
        }
        if accepted.is_empty() {
            for (op, table) in operations
                .iter()
                .zip(list.sequence_values::<Table>().flatten())
            {
                if let Some(version) = table
                    .get::<LuaValue>("version")
                    .ok()
                    .as_ref()
                    .and_then(number)
                {
                    accepted.push((op.id.clone(), version));
                }
            }
        }
        let after = self.traffic();
        Ok(PushReply {
            success,
            conflicts,
            accepted,
            bytes_sent: after.0.saturating_sub(before.0),
            bytes_received: after.1.saturating_sub(before.1),
        })
    }
}

/// A conflict entry of a push answer (`{id = story_id, type, op_id?, server_version?}`).
fn server_conflict(value: &Value) -> Option<ServerConflict> {
    Some(ServerConflict {
        id: value.get("id")?.as_str()?.to_owned(),
        conflict_type: value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("concurrent_modification")
            .to_owned(),
        op_id: value
            .get("op_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        server_version: value
            .get("server_version")
            .and_then(Value::as_i64)
            .and_then(|v| u64::try_from(v).ok()),
        extra: Default::default(),
    })
}

/// The Lua instance as the engine's [`Host`]: events go through `self:_emit`.
struct LuaHost {
    lua: Lua,
    this: Table,
}

impl LuaHost {
    fn emit(&self, event: &str, data: Table) {
        if let Some(emit) = method(&self.this, "_emit") {
            if let Err(e) = emit.call::<()>((self.this.clone(), event, data)) {
                let message = callback_message(&e);
                if !message.contains("interrupted!") {
                    eprintln!("whisker-sync: emitting {event} failed: {message}");
                }
            }
        }
    }

    fn table(
        &self,
        fields: impl IntoIterator<Item = (&'static str, LuaValue)>,
    ) -> mlua::Result<Table> {
        let table = self.lua.create_table()?;
        for (k, v) in fields {
            table.raw_set(k, v)?;
        }
        Ok(table)
    }

    fn operation(&self, op: &Operation) -> mlua::Result<LuaValue> {
        operation_table(&self.lua, op).map(LuaValue::Table)
    }

    /// The conflict as the old API showed it to resolvers and listeners.
    fn conflict_table(&self, conflict: &Conflict) -> mlua::Result<Table> {
        let local = self.operation(&conflict.local)?;
        let remote = self.operation(&conflict.remote)?;
        let base = match &conflict.base {
            Some(base) => to_lua(&self.lua, base)?,
            None => LuaValue::Nil,
        };
        self.table([
            (
                "story_id",
                LuaValue::String(self.lua.create_string(&conflict.story_id)?),
            ),
            (
                "conflict_type",
                LuaValue::String(self.lua.create_string(conflict.conflict_type.as_str())?),
            ),
            (
                "local_operations",
                LuaValue::Table(self.lua.create_sequence_from([local.clone()])?),
            ),
            (
                "remote_operations",
                LuaValue::Table(self.lua.create_sequence_from([remote.clone()])?),
            ),
            ("local_version", local),
            ("remote_version", remote),
            ("base", base),
        ])
    }

    fn resolution_table(&self, conflict: &Conflict, outcome: &Outcome) -> mlua::Result<Table> {
        let content = |v: Option<&Value>| match v {
            Some(v) => to_lua(&self.lua, v),
            None => Ok(LuaValue::Nil),
        };
        let (winner, data, copy) = match outcome {
            Outcome::KeptLocal => ("local", content(conflict.local.data.as_ref())?, None),
            Outcome::TookRemote => ("remote", content(conflict.remote.data.as_ref())?, None),
            Outcome::Merged(merged) => ("merged", content(merged.as_ref())?, None),
            Outcome::KeptBoth { copy_id } => (
                "both",
                content(conflict.remote.data.as_ref())?,
                Some(copy_id),
            ),
            Outcome::Unresolved => ("pending", LuaValue::Nil, None),
        };
        let table = self.table([
            ("winner", LuaValue::String(self.lua.create_string(winner)?)),
            ("data", data),
        ])?;
        if let Some(copy_id) = copy {
            table.raw_set("copy_id", copy_id.as_str())?;
        }
        Ok(table)
    }

    fn decision(&self, result: LuaValue) -> Result<Option<Decision>, HostError> {
        let LuaValue::Table(result) = result else {
            return Ok(None);
        };
        let winner = match result.get::<LuaValue>("winner") {
            Ok(LuaValue::String(w)) => Some(w.to_string_lossy()),
            _ => None,
        };
        let data = |value: LuaValue| match value {
            LuaValue::Nil => Ok(None),
            value => match from_lua(&self.lua, value) {
                Ok(Ok(v)) => Ok(Some(v)),
                Ok(Err(e)) => Err(HostError(format!(
                    "conflict resolver returned data that cannot be synced: {e}"
                ))),
                Err(e) => Err(HostError(callback_message(&e))),
            },
        };
        Ok(Some(match winner.as_deref() {
            Some("local") => Decision::KeepLocal,
            Some("remote") => Decision::TakeRemote,
            Some("both") => Decision::KeepBoth,
            // Any other winner names the data to use; a table without a
            // winner is itself the data (the documented `on_conflict` form).
            Some(_) => Decision::Use(data(result.get("data").unwrap_or(LuaValue::Nil))?),
            None => Decision::Use(data(LuaValue::Table(result))?),
        }))
    }
}

impl Host for LuaHost {
    fn progress(&mut self, progress: Progress) {
        let fields = [
            ("current", integer(i64::from(progress.step.percent()))),
            ("total", integer(100)),
            ("items_done", integer(progress.done as i64)),
            ("items_total", integer(progress.total as i64)),
        ];
        if let Ok(table) = self.table(fields) {
            if table.raw_set("operation", progress.step.name()).is_ok() {
                self.emit("sync_progress", table);
            }
        }
    }

    fn resolve(&mut self, conflict: &Conflict) -> Result<Option<Decision>, HostError> {
        let Some(resolver) = method(&self.this, "_conflict_resolver") else {
            return Ok(None);
        };
        let table = self
            .conflict_table(conflict)
            .map_err(|e| HostError(callback_message(&e)))?;
        let result = resolver.call::<LuaValue>(table).map_err(|e| {
            HostError(format!(
                "conflict resolver raised an error: {}",
                callback_message(&e)
            ))
        })?;
        self.decision(result)
    }

    fn conflict_settled(&mut self, conflict: &Conflict, outcome: &Outcome, automatic: bool) {
        let payload = (|| {
            let table = self.lua.create_table()?;
            table.raw_set("conflict", self.conflict_table(conflict)?)?;
            table.raw_set("resolution", self.resolution_table(conflict, outcome)?)?;
            table.raw_set("auto_resolved", automatic)?;
            Ok::<_, mlua::Error>(table)
        })();
        match payload {
            Ok(table) => self.emit("conflict_detected", table),
            Err(e) => eprintln!(
                "whisker-sync: conflict event failed: {}",
                callback_message(&e)
            ),
        }
    }
}

/// Registers storage event listeners that mark stories for the next scan.
fn listen_to_storage(lua: &Lua, storage: &Table, signals: &Rc<Signals>) -> mlua::Result<bool> {
    let Some(on) = method(storage, "on") else {
        return Ok(false);
    };
    for event in [
        "story_saved",
        "story_created",
        "story_updated",
        "story_deleted",
        "metadata_updated",
    ] {
        let signals = Rc::downgrade(signals);
        let listener = lua.create_function(move |_, data: LuaValue| {
            if let Some(signals) = signals.upgrade() {
                if let (false, LuaValue::Table(data)) = (signals.applying.get(), data) {
                    if let Ok(LuaValue::String(id)) = data.get::<LuaValue>("id") {
                        signals.dirty.borrow_mut().insert(id.to_string_lossy());
                    }
                }
            }
            Ok(())
        })?;
        on.call::<()>((storage.clone(), event, listener))?;
    }
    let signals = Rc::downgrade(signals);
    let cleared = lua.create_function(move |_, ()| {
        if let Some(signals) = signals.upgrade() {
            signals.cleared.set(true);
        }
        Ok(())
    })?;
    on.call::<()>((storage.clone(), "storage_cleared", cleared))?;
    Ok(true)
}

/// `native.new(self, config)`: the native half of a new engine, or `nil, message`.
fn new_engine(lua: &Lua, (this, config): (Table, Table)) -> mlua::Result<MultiValue> {
    let strategy_name = match config.get::<LuaValue>("conflict_strategy")? {
        LuaValue::String(s) => s.to_string_lossy(),
        LuaValue::Nil => match this.get::<LuaValue>("_conflict_resolver")? {
            LuaValue::Function(_) => ConflictStrategy::Manual.as_str().to_owned(),
            _ => ConflictStrategy::LastWriteWins.as_str().to_owned(),
        },
        other => {
            return failure(
                lua,
                format!(
                    "conflict_strategy must be a string, got {}",
                    other.type_name()
                ),
            )
        }
    };
    let strategy = match ConflictStrategy::parse(&strategy_name) {
        Ok(strategy) => strategy,
        Err(e) => return failure(lua, e.to_string()),
    };
    let storage = table_field(&this, "_storage")?;
    let state = match config.get::<LuaValue>("state_manager")? {
        LuaValue::Table(manager) => EngineState::Persistent(state_manager_of(&manager)?),
        _ => match &storage {
            Some(storage) if has_backend(storage) => {
                match StateManager::open(LuaStore::new(storage.clone())) {
                    Ok(manager) => EngineState::Persistent(Rc::new(RefCell::new(manager))),
                    Err(e) => return failure(lua, format!("cannot open sync state: {e}")),
                }
            }
            _ => match StateManager::open(TransientStore) {
                Ok(manager) => EngineState::Memory(Box::new(manager)),
                Err(e) => return failure(lua, format!("cannot open sync state: {e}")),
            },
        },
    };
    let device_id = match config.get::<LuaValue>("device_id")? {
        LuaValue::String(id) => id.to_string_lossy(),
        _ => match &state {
            EngineState::Persistent(manager) => manager.borrow().device_id().to_owned(),
            EngineState::Memory(manager) => manager.device_id().to_owned(),
        },
    };
    let filter = match selective_filter(&config) {
        Ok(filter) => filter,
        Err(e) => return failure(lua, e),
    };
    let signals = Rc::new(Signals::default());
    let tracks_events = match &storage {
        Some(storage) => listen_to_storage(lua, storage, &signals)?,
        None => false,
    };
    let mut engine = Engine::new(EngineConfig {
        device_id: device_id.clone(),
        strategy,
        tracks_events,
    });
    engine.set_filter(filter);
    let handle = EngineHandle {
        engine: RefCell::new(engine),
        state: RefCell::new(state),
        signals,
        next_sync: Cell::new(None),
        failures: Cell::new(0),
        listening_to: Cell::new(None),
    };
    Ok(MultiValue::from_iter([
        LuaValue::UserData(lua.create_userdata(handle)?),
        LuaValue::String(lua.create_string(&device_id)?),
        LuaValue::String(lua.create_string(strategy.as_str())?),
    ]))
}

/// `config.selective = {stories = {patterns…}, tags = {tags…}}`: the stories
/// this device syncs (all of them without it).
fn selective_filter(config: &Table) -> Result<StoryFilter, String> {
    let selective = match config.get::<LuaValue>("selective") {
        Ok(LuaValue::Table(t)) => t,
        Ok(LuaValue::Nil) => return Ok(StoryFilter::default()),
        Ok(other) => {
            return Err(format!(
                "selective must be a table, got {}",
                other.type_name()
            ))
        }
        Err(e) => return Err(callback_message(&e)),
    };
    let list = |name: &str| -> Result<Vec<String>, String> {
        match selective.get::<LuaValue>(name) {
            Ok(LuaValue::Nil) => Ok(Vec::new()),
            Ok(LuaValue::Table(items)) => items
                .sequence_values::<LuaValue>()
                .map(|item| match item {
                    Ok(LuaValue::String(s)) => Ok(s.to_string_lossy()),
                    _ => Err(format!("selective.{name} must be a list of strings")),
                })
                .collect(),
            _ => Err(format!("selective.{name} must be a list of strings")),
        }
    };
    StoryFilter::new(list("stories")?, list("tags")?)
}

fn has_backend(storage: &Table) -> bool {
    match storage.get::<LuaValue>("backend") {
        Ok(LuaValue::Table(backend)) => {
            method(&backend, "load").is_some() && method(&backend, "save").is_some()
        }
        _ => false,
    }
}

impl EngineHandle {
    /// Runs `f` with the engine and its state (`Err` when a sync is already running).
    fn with_engine<R>(
        &self,
        f: impl FnOnce(&mut Engine, &mut EngineState) -> Result<R, SyncError>,
    ) -> Result<R, SyncError> {
        let (Ok(mut engine), Ok(mut state)) =
            (self.engine.try_borrow_mut(), self.state.try_borrow_mut())
        else {
            return Err(SyncError::Host(HostError(
                "Sync already in progress".into(),
            )));
        };
        if self.signals.cleared.replace(false) {
            engine.mark_all_dirty();
        }
        for id in std::mem::take(&mut *self.signals.dirty.borrow_mut()) {
            engine.mark_dirty(&id);
        }
        f(&mut engine, &mut state)
    }
}

/// Runs the engine's sync with the instance's current collaborators.
fn run_sync(lua: &Lua, this: &Table, handle: &EngineHandle) -> Result<SyncReport, SyncError> {
    // A field whose read raises counts as absent, like a missing one.
    let mut storage = LuaStorage::new(lua, table_field(this, "_storage").ok().flatten(), handle);
    let mut transport = table_field(this, "_transport")
        .ok()
        .flatten()
        .map(|t| LuaTransport {
            lua: lua.clone(),
            transport: t,
            storage: storage.storage.clone(),
            hashed: Rc::clone(&storage.hashed),
            connected: false,
        });
    let mut host = LuaHost {
        lua: lua.clone(),
        this: this.clone(),
    };
    handle.with_engine(|engine, state| {
        let transport = transport.as_mut().map(|t| t as &mut dyn Transport);
        match state {
            EngineState::Persistent(manager) => {
                let mut manager = manager.try_borrow_mut().map_err(|_| {
                    SyncError::Host(HostError("the sync state manager is in use".into()))
                })?;
                engine.sync(&mut storage, transport, &mut manager, &mut host)
            }
            EngineState::Memory(manager) => {
                engine.sync(&mut storage, transport, manager, &mut host)
            }
        }
    })
}

fn record_failure(handle: &EngineHandle, message: &str) {
    let recorded = match &*handle.state.borrow() {
        EngineState::Persistent(manager) => manager
            .try_borrow_mut()
            .map(|mut m| m.record_error(message)),
        EngineState::Memory(_) => return,
    };
    if let Ok(Err(e)) = recorded {
        eprintln!("whisker-sync: cannot record the sync error: {e}");
    }
}

/// `engine:sync_now()` → `true` or `false, message`.
fn sync_now(lua: &Lua, this: Table) -> mlua::Result<MultiValue> {
    let refuse = |message: String| -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_iter([
            LuaValue::Boolean(false),
            LuaValue::String(lua.create_string(message)?),
        ]))
    };
    if this.get::<LuaValue>("_status")? == LuaValue::String(lua.create_string(status::SYNCING)?) {
        return refuse("Sync already in progress".into());
    }
    let handle = handle_of(&this)?;
    this.set("_status", status::SYNCING)?;
    let outcome = run_sync(lua, &this, &handle);
    if let Err(interrupt) = take_interrupt() {
        this.set("_status", status::IDLE)?;
        return Err(interrupt);
    }
    let host = LuaHost {
        lua: lua.clone(),
        this: this.clone(),
    };
    match outcome {
        Ok(report) => {
            handle.failures.set(0);
            this.set("_status", status::IDLE)?;
            let now = now_seconds();
            if report.exchanged {
                this.set("_last_sync_time", integer(now))?;
                let version = match &*handle.state.borrow() {
                    EngineState::Persistent(m) => m.borrow().server_version(),
                    EngineState::Memory(m) => m.server_version(),
                };
                this.set("_sync_version", integer(version as i64))?;
            }
            let completed = host.table([
                ("operations_applied", integer(report.applied as i64)),
                ("conflicts_resolved", integer(report.conflicts as i64)),
                ("conflicts_pending", integer(report.unresolved as i64)),
                ("operations_pushed", integer(report.pushed as i64)),
                ("bytes_sent", integer(report.bytes_sent as i64)),
                ("bytes_received", integer(report.bytes_received as i64)),
                ("duration_ms", integer(report.duration_ms as i64)),
                ("timestamp", integer(now)),
            ])?;
            host.emit("sync_completed", completed);
            Ok(MultiValue::from_iter([LuaValue::Boolean(true)]))
        }
        Err(e) => {
            let message = e.to_string();
            this.set("_status", status::ERROR)?;
            record_failure(&handle, &message);
            let failures = handle.failures.get() + 1;
            handle.failures.set(failures);
            let failed = host.table([
                ("error", LuaValue::String(lua.create_string(&message)?)),
                ("retry_count", integer(i64::from(failures - 1))),
            ])?;
            host.emit("sync_failed", failed);
            refuse(message)
        }
    }
}

fn interval(this: &Table) -> Duration {
    let ms = match this.get::<LuaValue>("_sync_interval") {
        Ok(LuaValue::Integer(ms)) => crate::values::int64(ms) as f64,
        Ok(LuaValue::Number(ms)) => ms,
        _ => 60_000.0,
    };
    Duration::from_millis(if ms.is_finite() && ms >= 100.0 {
        ms as u64
    } else {
        100
    })
}

/// Listens to the transport's pushed remote changes, once per transport.
fn listen_to_transport(lua: &Lua, this: &Table, handle: &EngineHandle) -> mlua::Result<()> {
    let LuaValue::Table(transport) = this.get::<LuaValue>("_transport")? else {
        return Ok(());
    };
    let identity = transport.to_pointer() as usize;
    if handle.listening_to.get() == Some(identity) {
        return Ok(());
    }
    let Some(on) = method(&transport, "on") else {
        return Ok(());
    };
    let signals = Rc::downgrade(&handle.signals);
    let listener = lua.create_function(move |_, _: LuaValue| {
        if let Some(signals) = signals.upgrade() {
            signals.remote_change.set(true);
        }
        Ok(())
    })?;
    on.call::<()>((transport, "remote_change", listener))?;
    handle.listening_to.set(Some(identity));
    Ok(())
}

/// `engine:start_sync()`: syncs now, then every `sync_interval` ms and on
/// pushed remote changes, driven by `step`/`wait` (or the CLI's run loop).
fn start_sync(lua: &Lua, this: Table) -> mlua::Result<()> {
    if this.get::<bool>("_running").unwrap_or(false) {
        return Ok(());
    }
    this.set("_running", true)?;
    let host = LuaHost {
        lua: lua.clone(),
        this: this.clone(),
    };
    host.emit("sync_started", lua.create_table()?);
    sync_now(lua, this.clone())?;
    let handle = handle_of(&this)?;
    listen_to_transport(lua, &this, &handle)?;
    let due = Instant::now() + interval(&this);
    handle.next_sync.set(Some(due));
    this.set(
        "_sync_timer",
        integer(now_seconds() + interval(&this).as_secs() as i64),
    )?;
    Ok(())
}

/// `engine:stop_sync()`: stops periodic syncing.
fn stop_sync(lua: &Lua, this: Table) -> mlua::Result<()> {
    if !this.get::<bool>("_running").unwrap_or(false) {
        return Ok(());
    }
    handle_of(&this)?.next_sync.set(None);
    this.set("_running", false)?;
    this.set("_sync_timer", LuaValue::Nil)?;
    let host = LuaHost {
        lua: lua.clone(),
        this: this.clone(),
    };
    host.emit("sync_stopped", lua.create_table()?);
    Ok(())
}

/// Lets the transport deliver what it received (WebSocket pushes).
fn poll_transport(this: &Table) -> mlua::Result<()> {
    if let Ok(LuaValue::Table(transport)) = this.get::<LuaValue>("_transport") {
        if let Some(poll) = method(&transport, "poll") {
            if let Err(e) = poll.call::<()>(transport) {
                return Err(mlua::Error::runtime(callback_message(&e)));
            }
        }
    }
    Ok(())
}

/// `engine:step()`: for hosts with their own event loop. Syncs when the
/// interval elapsed or the server pushed a change; returns `true` (plus the
/// sync's result) when it synced, `false` otherwise.
fn step(lua: &Lua, this: Table) -> mlua::Result<MultiValue> {
    if !this.get::<bool>("_running").unwrap_or(false) {
        return Ok(MultiValue::from_iter([LuaValue::Boolean(false)]));
    }
    poll_transport(&this)?;
    let handle = handle_of(&this)?;
    let due = handle
        .next_sync
        .get()
        .is_some_and(|due| Instant::now() >= due);
    if !due && !handle.signals.remote_change.get() {
        return Ok(MultiValue::from_iter([LuaValue::Boolean(false)]));
    }
    handle.signals.remote_change.set(false);
    drop(handle);
    let result = sync_now(lua, this.clone())?;
    let handle = handle_of(&this)?;
    if this.get::<bool>("_running").unwrap_or(false) {
        handle.next_sync.set(Some(Instant::now() + interval(&this)));
        this.set(
            "_sync_timer",
            integer(now_seconds() + interval(&this).as_secs() as i64),
        )?;
    }
    let mut values = MultiValue::from_iter([LuaValue::Boolean(true)]);
    values.extend(result);
    Ok(values)
}

/// `engine:wait(seconds)`: sleeps until the next sync is due, a remote change
/// arrives, or `seconds` pass, whichever is first. Returns promptly so that
/// the interpreter can handle Ctrl-C between waits.
fn wait(_: &Lua, (this, seconds): (Table, Option<f64>)) -> mlua::Result<()> {
    let limit = Duration::from_secs_f64(
        seconds
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(1.0)
            .min(3600.0),
    );
    let until = Instant::now() + limit;
    let slice = Duration::from_millis(50);
    loop {
        poll_transport(&this)?;
        let handle = handle_of(&this)?;
        let now = Instant::now();
        let due = handle.next_sync.get().is_some_and(|due| now >= due);
        if due || handle.signals.remote_change.get() || now >= until {
            return Ok(());
        }
        drop(handle);
        std::thread::sleep(slice.min(until - now));
    }
}

/// A conflict table of the old API as the engine's [`Conflict`].
fn conflict_from_lua(lua: &Lua, table: &Table) -> Result<Conflict, String> {
    let story_id = table
        .get::<String>("story_id")
        .map_err(|_| "conflict.story_id must be a string".to_owned())?;
    let op = |name: &str| -> Result<Operation, String> {
        let LuaValue::Table(op) = table.get::<LuaValue>(name).unwrap_or(LuaValue::Nil) else {
            return Err(format!("conflict.{name} must be an operation table"));
        };
        let value = from_lua(lua, LuaValue::Table(op))
            .map_err(|e| callback_message(&e))?
            .map_err(|e| format!("conflict.{name}: {e}"))?;
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let op_type = value
            .get("type")
            .and_then(Value::as_str)
            .and_then(OpType::parse)
            .unwrap_or(OpType::Update);
        Ok(Operation {
            id: text("id"),
            op_type,
            story_id: story_id.clone(),
            data: value.get("data").filter(|d| !d.is_null()).cloned(),
            metadata: Default::default(),
            timestamp: value
                .get("timestamp")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                .floor() as i64,
            device_id: text("device_id"),
            base_version: None,
            version: value
                .get("version")
                .and_then(Value::as_i64)
                .and_then(|v| u64::try_from(v).ok()),
            extra: Default::default(),
        })
    };
    let (local, remote) = (op("local_version")?, op("remote_version")?);
    Ok(Conflict {
        conflict_type: ConflictType::of(Some(local.op_type), Some(remote.op_type)),
        story_id,
        local,
        remote,
        base: None,
    })
}

/// `engine:_resolve_conflicts(conflicts)`: settles conflict tables of the old
/// API by the engine's strategy (or resolver) and writes the result to storage.
fn resolve_conflicts(lua: &Lua, (this, conflicts): (Table, Table)) -> mlua::Result<MultiValue> {
    let handle = handle_of(&this)?;
    let mut storage = LuaStorage::new(lua, table_field(&this, "_storage")?, &handle);
    let mut host = LuaHost {
        lua: lua.clone(),
        this: this.clone(),
    };
    let engine = handle
        .engine
        .try_borrow()
        .map_err(|_| mlua::Error::runtime("Sync already in progress"))?;
    for table in conflicts.sequence_values::<Table>() {
        let conflict = match conflict_from_lua(lua, &table?) {
            Ok(c) => c,
            Err(e) => return failure(lua, e),
        };
        let settled = engine
            .settle(&conflict, &mut host)
            .and_then(|(outcome, automatic)| {
                write_outcome(&mut storage, &conflict, &outcome).map(|()| (outcome, automatic))
            });
        match settled {
            Ok((outcome, automatic)) => host.conflict_settled(&conflict, &outcome, automatic),
            Err(e) => return failure(lua, e.to_string()),
        }
    }
    Ok(MultiValue::from_iter([LuaValue::Boolean(true)]))
}

/// `engine:get_conflicts()`: conflicts waiting for the user (manual strategy).
fn get_conflicts(lua: &Lua, this: Table) -> mlua::Result<LuaValue> {
    let handle = handle_of(&this)?;
    let conflicts = match &*handle.state.borrow() {
        EngineState::Persistent(m) => m.borrow().conflicts().to_vec(),
        EngineState::Memory(m) => m.conflicts().to_vec(),
    };
    to_lua(lua, &Value::Array(conflicts)).map(|v| match v {
        LuaValue::Nil => LuaValue::Table(lua.create_table().expect("table")),
        v => v,
    })
}

/// `engine:resolve_conflict(story_id, choice, data?)`: settles a conflict
/// left for the user; `choice` is `"local"`, `"remote"`, `"both"` or
/// `"merged"` (with `data`). The next sync pushes the result.
fn resolve_conflict(
    lua: &Lua,
    (this, story_id, choice, data): (Table, String, String, LuaValue),
) -> mlua::Result<MultiValue> {
    let decision = match choice.as_str() {
        "local" => Decision::KeepLocal,
        "remote" => Decision::TakeRemote,
        "both" => Decision::KeepBoth,
        "merged" => match data {
            LuaValue::Nil => Decision::Use(None),
            data => match from_lua(lua, data)? {
                Ok(v) => Decision::Use(Some(v)),
                Err(e) => return failure(lua, format!("data cannot be synced: {e}")),
            },
        },
        other => {
            return failure(
                lua,
                format!("unknown choice \"{other}\" (use local, remote, both or merged)"),
            )
        }
    };
    let handle = handle_of(&this)?;
    let mut storage = LuaStorage::new(lua, table_field(&this, "_storage")?, &handle);
    let resolved = handle.with_engine(|engine, state| match state {
        EngineState::Persistent(manager) => {
            let mut manager = manager.try_borrow_mut().map_err(|_| {
                SyncError::Host(HostError("the sync state manager is in use".into()))
            })?;
            engine.resolve_held(&story_id, decision, &mut storage, &mut manager)
        }
        EngineState::Memory(manager) => {
            engine.resolve_held(&story_id, decision, &mut storage, manager)
        }
    });
    match resolved {
        Ok(_) => Ok(MultiValue::from_iter([LuaValue::Boolean(true)])),
        Err(e) => failure(lua, e.to_string()),
    }
}

/// The engine part of the native module.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("new", lua.create_function(new_engine)?)?;
    exports.set("sync_now", lua.create_function(sync_now)?)?;
    exports.set("start_sync", lua.create_function(start_sync)?)?;
    exports.set("stop_sync", lua.create_function(stop_sync)?)?;
    exports.set("step", lua.create_function(step)?)?;
    exports.set("wait", lua.create_function(wait)?)?;
    exports.set("resolve_conflicts", lua.create_function(resolve_conflicts)?)?;
    exports.set("get_conflicts", lua.create_function(get_conflicts)?)?;
    exports.set("resolve_conflict", lua.create_function(resolve_conflict)?)?;
    Ok(exports)
}
