//! `whisker.storage.sync.transports.http` for Lua: the real request behind
//! the default `_request`, and the JSON and answer checks the Lua class
//! applies to whatever `_request` returns (so monkeypatched `_request`s keep
//! working). JSON helpers are shared with the WebSocket transport.

use std::path::PathBuf;

use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, Value as LuaValue};
use sync_core::transport::http::{self, HttpClient, HttpError, Method, Request};
use sync_core::transport::seconds;
use sync_core::transport::websocket::check_fetch;
use sync_core::value::{Map, Value};

use crate::runtime::block_on;
use crate::values::{failure, from_lua, success, to_lua};

/// The native HTTP client of a transport instance (its `_native` field).
pub(crate) struct HttpHandle {
    pub(crate) client: HttpClient,
}

fn number(value: &LuaValue) -> Option<f64> {
    match *value {
        LuaValue::Integer(i) => Some(i as f64),
        LuaValue::Number(n) => Some(n),
        _ => None,
    }
}

/// Lua arguments of `request`.
struct RequestArgs {
    method: String,
    url: String,
    headers: Option<Table>,
    body: Option<mlua::LuaString>,
    timeout: LuaValue,
    max_retries: LuaValue,
    retry_delay: LuaValue,
    max_response_bytes: LuaValue,
}

impl RequestArgs {
    fn request(self) -> Result<Request, String> {
        let method = match self.method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            other => return Err(format!("unsupported HTTP method {other}")),
        };
        let mut headers = Vec::new();
        if let Some(table) = self.headers {
            for pair in table.pairs::<String, LuaValue>() {
                let (name, value) = pair.map_err(|e| e.to_string())?;
                let value = match value {
                    LuaValue::String(s) => s.to_string_lossy(),
                    LuaValue::Integer(i) => i.to_string(),
                    LuaValue::Number(n) => n.to_string(),
                    _ => continue,
                };
                headers.push((name, value));
            }
        }
        let max_response_bytes = number(&self.max_response_bytes)
            .filter(|n| *n >= 1.0)
            .map_or(http::DEFAULT_MAX_RESPONSE_BYTES, |n| n as usize);
        Ok(Request {
            method,
            url: self.url,
            headers,
            body: self.body.map(|b| b.as_bytes().to_vec()),
            timeout: seconds(number(&self.timeout).unwrap_or(30.0)),
            max_retries: number(&self.max_retries).map_or(3, |n| n.clamp(0.0, 100.0) as u32),
            retry_delay: seconds(number(&self.retry_delay).unwrap_or(1.0)),
            max_response_bytes,
        })
    }
}

impl UserData for HttpHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // request(method, url, headers, body?, timeout, max_retries, retry_delay, max_response_bytes?)
        //   → {status, body, headers} or nil, message
        methods.add_method(
            "request",
            |lua,
             this,
             (method, url, headers, body, timeout, max_retries, retry_delay, max_bytes): (
                String,
                String,
                Option<Table>,
                Option<mlua::LuaString>,
                LuaValue,
                LuaValue,
                LuaValue,
                LuaValue,
            )| {
                let args = RequestArgs {
                    method,
                    url,
                    headers,
                    body,
                    timeout,
                    max_retries,
                    retry_delay,
                    max_response_bytes: max_bytes,
                };
                let request = match args.request() {
                    Ok(request) => request,
                    Err(message) => return failure(lua, message),
                };
                let client = this.client.clone();
                let response = match block_on(async move { client.send(&request).await }) {
                    Ok(Ok(response)) => response,
                    Ok(Err(e)) => return failure(lua, e.to_string()),
                    Err(e) => return failure(lua, e.to_string()),
                };
                let table = lua.create_table()?;
                table.set("status", response.status)?;
                table.set("body", lua.create_string(&response.body)?)?;
                let headers = lua.create_table()?;
                for (name, value) in response.headers {
                    headers.set(name, value)?;
                }
                table.set("headers", headers)?;
                table.set("attempts", response.attempts)?;
                success(lua, table)
            },
        );
        crate::blob::add_methods(methods);
        methods.add_method("traffic", |lua, this, ()| {
            let traffic = this.client.traffic();
            let table = lua.create_table()?;
            table.set("sent", crate::values::integer(traffic.sent as i64))?;
            table.set("received", crate::values::integer(traffic.received as i64))?;
            Ok(table)
        });
    }
}

/// `client(ca_file?, compression?)` → a native client, or `nil, message`;
/// `compression` false makes a client that never negotiates gzip.
fn client(
    lua: &Lua,
    (ca_file, compression): (Option<String>, Option<bool>),
) -> mlua::Result<MultiValue> {
    let ca_file = ca_file.map(PathBuf::from);
    match HttpClient::new(ca_file.as_deref()) {
        Ok(client) => {
            let client = if compression == Some(false) {
                client.without_compression()
            } else {
                client
            };
            success(lua, lua.create_userdata(HttpHandle { client })?)
        }
        Err(e) => failure(lua, e.to_string()),
    }
}

/// `encode(value)` → JSON text, or `nil, "Failed to serialize JSON: …"`.
/// An empty table is `{}`; `array_fields` (a list of names) are written as
/// `[]` when they hold an empty table.
fn encode(
    lua: &Lua,
    (value, array_fields): (LuaValue, Option<Vec<String>>),
) -> mlua::Result<MultiValue> {
    let mut value = match from_lua(lua, value)? {
        Ok(value) => value,
        Err(e) => return failure(lua, format!("Failed to serialize JSON: {e}")),
    };
    if let Value::Object(map) = &mut value {
        for name in array_fields.unwrap_or_default() {
            if let Some(field) = map.get_mut(&name) {
                if matches!(field, Value::Object(m) if m.is_empty()) {
                    *field = Value::Array(Vec::new());
                }
            }
        }
    }
    match serde_json::to_string(&value) {
        Ok(text) => success(lua, text),
        Err(e) => failure(lua, format!("Failed to serialize JSON: {e}")),
    }
}

/// `decode(text, empty_message)` → a table, or `nil, message`: `empty_message`
/// for nil or empty text, `"Failed to deserialize JSON: …"` for bad JSON.
fn decode(lua: &Lua, (text, empty): (LuaValue, String)) -> mlua::Result<MultiValue> {
    let bytes = match &text {
        LuaValue::String(s) if !s.as_bytes().is_empty() => s.as_bytes().to_vec(),
        _ => return failure(lua, empty),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) => success(lua, to_lua(lua, &value)?),
        Err(e) => failure(lua, format!("Failed to deserialize JSON: {e}")),
    }
}

/// A body from a `_request` response, checked and decoded.
fn answer(status: &LuaValue, body: &LuaValue, ok: &[u16]) -> Result<Map, HttpError> {
    let status = number(status).map_or(0, |n| n as u16);
    let bytes = match body {
        LuaValue::String(s) => s.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    if !ok.contains(&status) {
        return Err(HttpError::Status {
            status,
            message: http::error_message(status, &bytes),
        });
    }
    match http::decode::<Value>(&bytes)? {
        Value::Object(map) => Ok(map),
        _ => Err(HttpError::InvalidJson("expected a JSON object".to_owned())),
    }
}

/// The old `x or default` on a decoded field.
fn or_default(map: &mut Map, name: &str, default: Value) -> Value {
    match map.remove(name) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => default,
        Some(value) => value,
    }
}

fn respond_with(lua: &Lua, fields: Vec<(&str, Value)>) -> mlua::Result<MultiValue> {
    let table = lua.create_table()?;
    for (name, value) in fields {
        match (name, value) {
            (_, Value::Bool(b)) => table.set(name, b)?,
            (_, value) => table.set(name, to_lua(lua, &value)?)?,
        }
    }
    success(lua, table)
}

/// `parse_fetch(status, body)` → `{operations, version, has_more, features?}` or `nil, message`.
fn parse_fetch(lua: &Lua, (status, body): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    let mut map = match answer(&status, &body, &[200]) {
        Ok(map) => map,
        Err(e) => return failure(lua, e.to_string()),
    };
    if let Err(message) = check_fetch(&Value::Object(map.clone())) {
        return failure(lua, format!("Invalid response: {message}"));
    }
    let operations = match map.remove("operations") {
        Some(Value::Array(items)) => Value::Array(items),
        _ => Value::Array(Vec::new()),
    };
    let version = or_default(&mut map, "version", Value::Int(0));
    let has_more = or_default(&mut map, "has_more", Value::Bool(false));
    let mut fields = vec![
        ("operations", operations),
        ("version", version),
        ("has_more", has_more),
    ];
    if let Some(features @ Value::Array(_)) = map.remove("features") {
        fields.push(("features", features));
    }
    respond_with(lua, fields)
}

/// `parse_push(status, body)` → `{success, conflicts, version}` or `nil, message`.
fn parse_push(lua: &Lua, (status, body): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    let mut map = match answer(&status, &body, &[200, 201]) {
        Ok(map) => map,
        Err(e) => return failure(lua, e.to_string()),
    };
    let success_value = or_default(&mut map, "success", Value::Bool(false));
    let conflicts = or_default(&mut map, "conflicts", Value::empty_object());
    let version = or_default(&mut map, "version", Value::Int(0));
    let mut fields = vec![
        ("success", success_value),
        ("conflicts", conflicts),
        ("version", version),
    ];
    if let Some(accepted) = map.remove("accepted") {
        fields.push(("accepted", accepted));
    }
    respond_with(lua, fields)
}

/// `parse_version(status, body)` → `{version}` or `nil, message`.
fn parse_version(lua: &Lua, (status, body): (LuaValue, LuaValue)) -> mlua::Result<MultiValue> {
    let mut map = match answer(&status, &body, &[200]) {
        Ok(map) => map,
        Err(e) => return failure(lua, e.to_string()),
    };
    match map.remove("version") {
        Some(version @ (Value::Int(_) | Value::Float(_))) => {
            respond_with(lua, vec![("version", version)])
        }
        _ => failure(lua, "Invalid response: missing version number"),
    }
}

/// The HTTP part of the native module.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("client", lua.create_function(client)?)?;
    exports.set("parse_fetch", lua.create_function(parse_fetch)?)?;
    exports.set("parse_push", lua.create_function(parse_push)?)?;
    exports.set("parse_version", lua.create_function(parse_version)?)?;
    exports.set(
        "url_encode",
        lua.create_function(|_, s: Option<String>| {
            Ok(s.map(|s| http::url_encode(&s)).unwrap_or_default())
        })?,
    )?;
    Ok(exports)
}

/// JSON helpers shared by the transports.
pub(crate) fn json_module(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("encode", lua.create_function(encode)?)?;
    exports.set("decode", lua.create_function(decode)?)?;
    Ok(exports)
}
