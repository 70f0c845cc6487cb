//! Server settings: input limits, retention, WebSocket timing and blob storage.

use std::path::PathBuf;
use std::time::Duration;

/// Bounds on what a client may send. Exceeding one is a 400 or 413 that writes nothing.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (HTTP) or message (WebSocket), in bytes.
    pub max_body_bytes: usize,
    pub max_operations_per_push: usize,
    /// Deepest nesting of arrays and objects in a request, counting the outer object.
    pub max_json_depth: usize,
    pub max_story_id_bytes: usize,
    /// Largest operation id and device id, in bytes.
    pub max_id_bytes: usize,
    /// Largest page a client may ask for with `limit` (larger values are capped).
    pub max_page_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 * 1024 * 1024,
            max_operations_per_push: 1000,
            max_json_depth: 64,
            max_story_id_bytes: 256,
            max_id_bytes: 128,
            max_page_size: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// How long a deletion is still sent to new devices (in `since=0` snapshots).
    pub tombstone_retention: Duration,
    /// A WebSocket must authenticate within this time or is closed.
    pub ws_auth_timeout: Duration,
    /// The server pings each WebSocket this often.
    pub ws_ping_interval: Duration,
    /// A WebSocket that sends nothing (not even a pong) for this long is closed.
    pub ws_idle_timeout: Duration,
    /// Browser origins allowed to call the HTTP API (CORS); `*` allows any.
    /// Empty: no CORS headers (non-browser clients do not need them).
    pub cors_origins: Vec<String>,
    pub blobs: BlobSettings,
}

/// Large assets (`/blobs`): where they are kept and how large they may be.
#[derive(Debug, Clone)]
pub struct BlobSettings {
    /// Directory of the blob store; `None` turns the blob API off (501).
    pub dir: Option<PathBuf>,
    /// Largest blob accepted, in bytes.
    pub max_blob_bytes: u64,
    /// Largest chunk in one `PUT`, in bytes (after decompression).
    pub max_chunk_bytes: u64,
    /// Uploads left unfinished this long are deleted.
    pub upload_expiry: Duration,
}

impl Default for BlobSettings {
    fn default() -> Self {
        BlobSettings {
            dir: None,
            max_blob_bytes: 256 * 1024 * 1024,
            max_chunk_bytes: 8 * 1024 * 1024,
            upload_expiry: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            limits: Limits::default(),
            tombstone_retention: Duration::from_secs(30 * 24 * 3600),
            ws_auth_timeout: Duration::from_secs(10),
            ws_ping_interval: Duration::from_secs(30),
            ws_idle_timeout: Duration::from_secs(120),
            cors_origins: Vec::new(),
            blobs: BlobSettings::default(),
        }
    }
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `30d` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 500ms, 10s, 5m, 2h, 30d)"))?;
    let seconds = |factor: u64| {
        value
            .checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{text}` is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(24 * 3600),
        _ => Err(format!("unknown unit in `{text}` (use ms, s, m, h or d)")),
    }
}

/// Checks a `--cors-origin` value: `*` or `scheme://host[:port]`.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let valid = text == "*"
        || text.split_once("://").is_some_and(|(scheme, host)| {
            matches!(scheme, "http" | "https")
                && !host.is_empty()
                && !host.contains('/')
                && host.bytes().all(|b| b.is_ascii_graphic())
        });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!("`{text}` is not an origin (examples: https://editor.example.com, http://localhost:5173, *)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn origins() {
        assert!(parse_origin("https://editor.example.com").is_ok());
        assert!(parse_origin("http://localhost:5173").is_ok());
        assert!(parse_origin("*").is_ok());
        assert!(parse_origin("editor.example.com").is_err());
        assert!(parse_origin("https://x/path").is_err());
    }
}
