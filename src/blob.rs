//! Large assets for Lua: the blob calls behind the HTTP transport's
//! `put_asset`, `put_asset_data`, `get_asset` and `asset_status`
//! ([`sync_core::transport::blob`] does the work), plus SHA-256 helpers.
//!
//! Each call takes the transport's settings as a table
//! `{base_url, api_key, user_agent?, timeout?, max_retries?, retry_delay?, chunk_size?}`
//! (seconds for the times, bytes for `chunk_size`), so Lua code that changes
//! the transport's fields is honoured, and shares the transport's native
//! client (connections, traffic counters, what it learnt about the server).

use std::path::{Path, PathBuf};

use mlua::{Lua, MultiValue, Table, UserDataMethods, Value as LuaValue};
use sync_core::transport::blob::{
    self, BlobClient, BlobError, BlobStatus, DownloadReport, UploadReport,
};
use sync_core::transport::http::{HttpClient, HttpConfig};
use sync_core::transport::seconds;

use crate::http::HttpHandle;
use crate::runtime::block_on;
use crate::values::{failure, integer, success};

fn number(table: &Table, name: &str) -> mlua::Result<Option<f64>> {
    Ok(match table.get::<LuaValue>(name)? {
        LuaValue::Integer(i) => Some(i as f64),
        LuaValue::Number(n) => Some(n),
        _ => None,
    })
}

/// The blob client for a transport's settings table.
fn client(http: &HttpClient, settings: &Table) -> mlua::Result<Result<BlobClient, String>> {
    let (Some(base_url), Some(api_key)) = (
        settings.get::<Option<String>>("base_url")?,
        settings.get::<Option<String>>("api_key")?,
    ) else {
        return Ok(Err("the transport has no base_url or api_key".to_owned()));
    };
    let mut config = HttpConfig::new(base_url.trim_end_matches('/'), api_key);
    if let Some(agent) = settings.get::<Option<String>>("user_agent")? {
        config.user_agent = agent;
    }
    if let Some(timeout) = number(settings, "timeout")? {
        config.timeout = seconds(timeout);
    }
    if let Some(retries) = number(settings, "max_retries")? {
        config.max_retries = retries.clamp(0.0, 100.0) as u32;
    }
    if let Some(delay) = number(settings, "retry_delay")? {
        config.retry_delay = seconds(delay);
    }
    let chunk = number(settings, "chunk_size")?
        .filter(|n| *n >= 1.0)
        .map_or(0, |n| n.min(1e12) as usize);
    Ok(Ok(BlobClient::new(config, http.clone(), chunk)))
}

fn status_table(lua: &Lua, status: BlobStatus) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("sha256", status.sha256)?;
    if let Some(size) = status.size {
        table.set("size", integer(size as i64))?;
    }
    table.set("received", integer(status.received as i64))?;
    table.set("complete", status.complete)?;
    Ok(table)
}

fn upload_table(lua: &Lua, report: UploadReport) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("sha256", report.sha256)?;
    table.set("size", integer(report.size as i64))?;
    table.set("skipped", report.skipped)?;
    table.set("resumed_from", integer(report.resumed_from as i64))?;
    table.set("sent", integer(report.sent as i64))?;
    Ok(table)
}

fn download_table(lua: &Lua, report: DownloadReport) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("sha256", report.sha256)?;
    table.set("size", integer(report.size as i64))?;
    table.set("resumed_from", integer(report.resumed_from as i64))?;
    table.set("received", integer(report.received as i64))?;
    Ok(table)
}

/// Runs a blob call on the module's runtime: `(result table)` or `nil, message`.
fn run<T>(
    lua: &Lua,
    call: impl std::future::Future<Output = Result<T, BlobError>>,
    table: impl FnOnce(&Lua, T) -> mlua::Result<Table>,
) -> mlua::Result<MultiValue> {
    match block_on(call) {
        Ok(Ok(value)) => success(lua, table(lua, value)?),
        Ok(Err(e)) => failure(lua, e.to_string()),
        Err(e) => failure(lua, e.to_string()),
    }
}

/// Adds the blob methods to the native HTTP client userdata.
pub(crate) fn add_methods<M: UserDataMethods<HttpHandle>>(methods: &mut M) {
    // blob_status(settings, sha256) → {sha256, size?, received, complete} or nil, message
    methods.add_method(
        "blob_status",
        |lua, this, (settings, sha): (Table, String)| match client(&this.client, &settings)? {
            Ok(blobs) => run(lua, async move { blobs.status(&sha).await }, status_table),
            Err(message) => failure(lua, message),
        },
    );
    // put_blob_file(settings, path) → {sha256, size, skipped, resumed_from, sent} or nil, message
    methods.add_method(
        "put_blob_file",
        |lua, this, (settings, path): (Table, String)| match client(&this.client, &settings)? {
            Ok(blobs) => run(
                lua,
                async move { blobs.upload_file(Path::new(&path)).await },
                upload_table,
            ),
            Err(message) => failure(lua, message),
        },
    );
    // put_blob_data(settings, data) → as put_blob_file
    methods.add_method(
        "put_blob_data",
        |lua, this, (settings, data): (Table, mlua::LuaString)| {
            let bytes = data.as_bytes().to_vec();
            match client(&this.client, &settings)? {
                Ok(blobs) => run(
                    lua,
                    async move { blobs.upload_bytes(&bytes).await },
                    upload_table,
                ),
                Err(message) => failure(lua, message),
            }
        },
    );
    // get_blob(settings, sha256, dest) → {sha256, size, resumed_from, received} or nil, message
    methods.add_method(
        "get_blob",
        |lua, this, (settings, sha, dest): (Table, String, String)| match client(
            &this.client,
            &settings,
        )? {
            Ok(blobs) => {
                let dest = PathBuf::from(dest);
                run(
                    lua,
                    async move { blobs.download_to_file(&sha, &dest).await },
                    download_table,
                )
            }
            Err(message) => failure(lua, message),
        },
    );
}

/// `sha256_file(path)` → hex digest and size, or `nil, message`.
fn sha256_file(lua: &Lua, path: String) -> mlua::Result<MultiValue> {
    match blob::sha256_file(Path::new(&path)) {
        Ok((hex, size)) => Ok(MultiValue::from_iter([
            LuaValue::String(lua.create_string(&hex)?),
            integer(size as i64),
        ])),
        Err(e) => failure(lua, e.to_string()),
    }
}

/// `parse_hash(text)` → lower-case hex of `sha256:<hex>` or `<hex>`, or `nil, message`.
fn parse_hash(lua: &Lua, text: String) -> mlua::Result<MultiValue> {
    match blob::parse_hash(&text) {
        Ok(hex) => success(lua, hex),
        Err(e) => failure(lua, e.to_string()),
    }
}

/// `file_stat(path)` → size and modification time (Unix seconds, fractional),
/// or nil when there is no such file.
fn file_stat(_: &Lua, path: String) -> mlua::Result<MultiValue> {
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(MultiValue::from_iter([LuaValue::Nil]));
    };
    if !meta.is_file() {
        return Ok(MultiValue::from_iter([LuaValue::Nil]));
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    Ok(MultiValue::from_iter([
        integer(meta.len() as i64),
        LuaValue::Number(mtime),
    ]))
}

/// `copy_file(from, to)` → true, or `nil, message`. Missing folders of `to`
/// are created; the copy goes through a temporary file renamed into place.
fn copy_file(lua: &Lua, (from, to): (String, String)) -> mlua::Result<MultiValue> {
    let to = PathBuf::from(to);
    let copied = (|| {
        if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut temp = to.as_os_str().to_owned();
        temp.push(".copying");
        let temp = PathBuf::from(temp);
        std::fs::copy(&from, &temp)?;
        std::fs::rename(&temp, &to)
    })();
    match copied {
        Ok(()) => success(lua, true),
        Err(e) => failure(lua, format!("cannot copy {from} to {}: {e}", to.display())),
    }
}

/// The asset helpers of the native module (`native.blob`).
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("sha256_file", lua.create_function(sha256_file)?)?;
    exports.set(
        "sha256",
        lua.create_function(|_, data: mlua::LuaString| Ok(blob::sha256_hex(&data.as_bytes())))?,
    )?;
    exports.set("parse_hash", lua.create_function(parse_hash)?)?;
    exports.set("file_stat", lua.create_function(file_stat)?)?;
    exports.set("copy_file", lua.create_function(copy_file)?)?;
    exports.set("REF_PREFIX", blob::REF_PREFIX)?;
    Ok(exports)
}
