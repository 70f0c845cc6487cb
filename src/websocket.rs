//! `whisker.storage.sync.transports.websocket` for Lua: the native connection
//! ([`WsClient`]) behind a transport that has no injected `websocket_client`.
//!
//! The client's background task only queues events; they reach Lua here, on
//! the Lua thread, through the `on_event` function the Lua module passes to
//! `request` (while it waits) and `step` (the engine's and CLI's poll).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, MultiValue, Table, UserData, UserDataMethods, Value as LuaValue};
use sync_core::transport::seconds;
use sync_core::transport::websocket::{WsClient, WsConfig, WsEvent, VERSION_PROBE};
use sync_core::value::Value;

use crate::runtime::block_on;
use crate::values::{failure, from_lua, integer, success, to_lua};

/// Longest single wait for events, so `step` with a huge timeout stays bounded per call.
const MAX_STEP: Duration = Duration::from_secs(3600);

struct WsHandle {
    client: Arc<WsClient>,
}

/// An event as the Lua module receives it: `{name = …, …}`.
fn event_table(lua: &Lua, event: WsEvent) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    match event {
        WsEvent::Connected => table.set("name", "connected")?,
        WsEvent::Disconnected { reason } => {
            table.set("name", "disconnected")?;
            table.set("reason", reason)?;
        }
        WsEvent::Reconnecting { attempt, delay } => {
            table.set("name", "reconnecting")?;
            table.set("attempt", attempt)?;
            table.set("delay", delay.as_secs_f64())?;
        }
        WsEvent::Message(message) => {
            table.set("name", "message_received")?;
            table.set("message", to_lua(lua, &message)?)?;
        }
        WsEvent::RemoteChange(operation) => {
            table.set("name", "remote_change")?;
            table.set("operation", to_lua(lua, &operation)?)?;
        }
    }
    Ok(table)
}

/// Hands one event to Lua. A failing callback is reported, not propagated:
/// the network side must not be torn down by a listener's error.
fn deliver(lua: &Lua, on_event: &Function, event: WsEvent) -> mlua::Result<()> {
    let table = event_table(lua, event)?;
    if let Err(e) = on_event.call::<()>(table) {
        eprintln!(
            "whisker-sync: websocket event handler failed: {}",
            crate::state_manager::lua_error_message(&e)
        );
    }
    Ok(())
}

/// Delivers every queued event; returns how many.
fn drain(lua: &Lua, client: &WsClient, on_event: &Function) -> mlua::Result<usize> {
    let mut count = 0;
    while let Some(event) = client.try_event() {
        deliver(lua, on_event, event)?;
        count += 1;
    }
    Ok(count)
}

fn number(value: &LuaValue) -> Option<f64> {
    match *value {
        LuaValue::Integer(i) => Some(i as f64),
        LuaValue::Number(n) => Some(n),
        _ => None,
    }
}

impl UserData for WsHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // request(kind, fields, timeout, on_event) → answer table or nil, message
        methods.add_method(
            "request",
            |lua, this, (kind, fields, wait, on_event): (String, LuaValue, LuaValue, Function)| {
                let mut fields = match from_lua(lua, fields)? {
                    Ok(Value::Object(map)) => map,
                    Ok(Value::Null) => Default::default(),
                    Ok(_) => return failure(lua, "request fields must be a table"),
                    Err(e) => return failure(lua, format!("Failed to serialize JSON: {e}")),
                };
                if let Some(ops) = fields.get_mut("operations") {
                    if matches!(ops, Value::Object(m) if m.is_empty()) {
                        *ops = Value::Array(Vec::new());
                    }
                }
                let wait = seconds(number(&wait).unwrap_or(5.0));
                let client = Arc::clone(&this.client);
                let mut answer = Box::pin(async move { client.request(&kind, fields, wait).await });
                drain(lua, &this.client, &on_event)?;
                let result = loop {
                    let client = Arc::clone(&this.client);
                    let outcome = block_on(async {
                        tokio::select! {
                            result = &mut answer => Ok(result),
                            event = client.next_event(MAX_STEP) => Err(event),
                        }
                    });
                    match outcome {
                        Err(e) => return failure(lua, e.to_string()),
                        Ok(Err(Some(event))) => deliver(lua, &on_event, event)?,
                        // No more events will come: only the answer (or its timeout) is left.
                        Ok(Err(None)) => match block_on(&mut answer) {
                            Ok(result) => break result,
                            Err(e) => return failure(lua, e.to_string()),
                        },
                        Ok(Ok(result)) => break result,
                    }
                };
                drain(lua, &this.client, &on_event)?;
                match result {
                    Ok(value) => success(lua, to_lua(lua, &value)?),
                    Err(e) => failure(lua, e.to_string()),
                }
            },
        );
        // step(timeout, on_event) → number of events delivered. Waits up to
        // `timeout` seconds for a first event, then delivers all queued ones.
        methods.add_method(
            "step",
            |lua, this, (wait, on_event): (LuaValue, Function)| {
                let mut count = drain(lua, &this.client, &on_event)?;
                let wait = seconds(number(&wait).unwrap_or(0.0)).min(MAX_STEP);
                if count == 0 && !wait.is_zero() {
                    let client = Arc::clone(&this.client);
                    let first = block_on(async move { client.next_event(wait).await });
                    match first {
                        Ok(Some(event)) => {
                            deliver(lua, &on_event, event)?;
                            count += 1 + drain(lua, &this.client, &on_event)?;
                        }
                        Ok(None) => {}
                        Err(e) => return Err(mlua::Error::runtime(e.to_string())),
                    }
                }
                Ok(count)
            },
        );
        methods.add_method("close", |_, this, ()| {
            this.client.close();
            Ok(())
        });
        methods.add_method("is_connected", |_, this, ()| Ok(this.client.is_connected()));
        methods.add_method("last_version", |_, this, ()| {
            Ok(integer(this.client.last_version() as i64))
        });
        methods.add_method("traffic", |lua, this, ()| {
            let traffic = this.client.traffic();
            let table = lua.create_table()?;
            table.set("sent", integer(traffic.sent as i64))?;
            table.set("received", integer(traffic.received as i64))?;
            Ok(table)
        });
    }
}

/// `connect(options)` → a native connection, or `nil, message`. Options:
/// `url`, `api_key`, `device_id`, `reconnect`, `ping_interval`,
/// `response_timeout`, `max_reconnect_delay` (seconds), `ca_file`,
/// `max_message_bytes`, `resume_from`, `compression` (false: no gzip frames).
fn connect(lua: &Lua, options: Table) -> mlua::Result<MultiValue> {
    let mut config = WsConfig::new(
        options.get::<String>("url")?,
        options.get::<String>("api_key")?,
    );
    config.device_id = options.get("device_id")?;
    config.reconnect = !matches!(
        options.get::<LuaValue>("reconnect")?,
        LuaValue::Boolean(false)
    );
    for (name, slot) in [
        ("ping_interval", &mut config.ping_interval),
        ("response_timeout", &mut config.response_timeout),
        ("max_reconnect_delay", &mut config.max_reconnect_delay),
    ] {
        if let Some(secs) = number(&options.get::<LuaValue>(name)?) {
            *slot = seconds(secs);
        }
    }
    config.ca_file = options.get::<Option<String>>("ca_file")?.map(PathBuf::from);
    if let Some(n) = number(&options.get::<LuaValue>("max_message_bytes")?) {
        config.max_message_bytes = n.max(1024.0) as usize;
    }
    if let Some(n) = number(&options.get::<LuaValue>("resume_from")?) {
        config.resume_from = n.max(0.0) as u64;
    }
    config.compression = !matches!(
        options.get::<LuaValue>("compression")?,
        LuaValue::Boolean(false)
    );
    match block_on(WsClient::connect(config)) {
        Ok(Ok(client)) => success(
            lua,
            lua.create_userdata(WsHandle {
                client: Arc::new(client),
            })?,
        ),
        Ok(Err(e)) => failure(lua, e.to_string()),
        Err(e) => failure(lua, e.to_string()),
    }
}

/// Seconds on a monotonic clock, for timeouts measured in Lua.
fn clock(_: &Lua, (): ()) -> mlua::Result<f64> {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    Ok(START.get_or_init(Instant::now).elapsed().as_secs_f64())
}

/// Sleeps this thread (at most a minute).
fn sleep(_: &Lua, secs: f64) -> mlua::Result<()> {
    std::thread::sleep(seconds(secs).min(Duration::from_secs(60)));
    Ok(())
}

/// The WebSocket part of the native module.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("connect", lua.create_function(connect)?)?;
    exports.set("clock", lua.create_function(clock)?)?;
    exports.set("sleep", lua.create_function(sleep)?)?;
    exports.set("version_probe", integer(VERSION_PROBE))?;
    Ok(exports)
}
