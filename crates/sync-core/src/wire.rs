//! Message shapes shared by clients and the reference server (see docs/PROTOCOL.md).
//!
//! The old Lua transports' JSON shapes are kept; every extension is an
//! additional, optional field, so old clients keep working.

use serde::{Deserialize, Serialize};

use crate::protocol::Operation;
use crate::value::Map;

/// `POST /operations` body and the WebSocket `push_operations` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRequest {
    pub device_id: String,
    pub operations: Vec<Operation>,
}

/// A pushed operation the server did not accept because its `base_version` was
/// stale. `id` is the story id and `type` is `"concurrent_modification"`, the
/// shape old clients already know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerConflict {
    pub id: String,
    #[serde(rename = "type")]
    pub conflict_type: String,
    /// The rejected operation's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    /// The story's current server version, which the client must rebase onto.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<u64>,
    #[serde(flatten)]
    pub extra: Map,
}

/// Answer to a push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushResponse {
    pub success: bool,
    #[serde(default)]
    pub conflicts: Vec<ServerConflict>,
    /// The namespace's sequence number after the push.
    #[serde(default)]
    pub version: u64,
    #[serde(flatten)]
    pub extra: Map,
}

/// Answer to `GET /operations?device=&since=&limit=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchResponse {
    pub operations: Vec<Operation>,
    /// Sequence number the client has now seen up to; pass it as `since` next time.
    pub version: u64,
    #[serde(default)]
    pub has_more: bool,
}

/// Answer to `GET /version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionResponse {
    pub version: u64,
}
