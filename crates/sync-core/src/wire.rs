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
    /// Extension: what the server can do beyond the old protocol
    /// (`["patch"]`: it applies patched updates, see [`crate::patch`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Conflict type for a patched update the server could not apply: the story
/// it holds is not the version the patch was made against, or the result's
/// content hash differs. The client sends the whole story instead.
pub const PATCH_REJECTED: &str = "patch_rejected";

/// Answer to `GET /version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionResponse {
    pub version: u64,
}

/// One operation a push stored, or had already stored: its id and the sequence
/// number it carries. Sent as the `accepted` array of a push answer (an
/// extension; old servers leave it out), so a client learns each story's new
/// server version exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedOperation {
    pub op_id: String,
    pub version: u64,
}

impl PushResponse {
    /// The `accepted` extension, read from the extra members; empty when the
    /// server did not send it or sent something else under that name.
    pub fn accepted(&self) -> Vec<AcceptedOperation> {
        self.extra
            .get("accepted")
            .and_then(|value| serde_json::to_value(value).ok())
            .and_then(|json| serde_json::from_value(json).ok())
            .unwrap_or_default()
    }
}

/// A WebSocket request id, echoed unchanged in the answer. Any JSON value:
/// the old Lua client sends integers.
pub type RequestId = crate::value::Value;

/// Messages a client sends over the WebSocket (JSON text frames, tagged by `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Must be the first message on a socket.
    Auth {
        api_key: String,
        /// Extension: the device this socket belongs to, so it gets no
        /// `remote_change` for its own pushes before its first request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        /// Extension: content codings the client can exchange in binary
        /// frames (`["gzip"]`); the server picks one in `auth_ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compression: Option<Vec<String>>,
    },
    SyncRequest {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        #[serde(default, deserialize_with = "whole_number")]
        since_version: u64,
        /// Extension: page size, as `limit` on `GET /operations`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        /// Extension: the client applies patched updates, as `patches=1` on
        /// `GET /operations` (see [`crate::patch`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        patches: bool,
    },
    PushOperations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
        device_id: String,
        #[serde(deserialize_with = "operation_list")]
        operations: Vec<Operation>,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
    },
}

/// Messages the server sends over the WebSocket. `Op` is how operations are
/// carried: [`Operation`] for clients; the server sends stored JSON as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<Op = Operation> {
    AuthOk {
        /// Extension: the coding chosen from the client's `compression`
        /// offer; large messages may then travel compressed in binary frames.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compression: Option<String>,
    },
    AuthFailed {
        reason: String,
    },
    SyncResponse {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
        operations: Vec<Op>,
        version: u64,
        #[serde(default)]
        has_more: bool,
        /// Extension: as [`FetchResponse::features`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    PushResponse {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
        #[serde(flatten)]
        response: PushResponse,
    },
    /// An operation another device of the same namespace just pushed.
    RemoteChange {
        operation: Op,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
        error: String,
    },
}

/// A non-negative whole number that may arrive as a float (`5.0`): Lua 5.1 and
/// some JSON encoders have no separate integer type.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let v = f64::deserialize(deserializer)?;
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 {
        Ok(v as u64)
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a non-negative whole number, got {v}"
        )))
    }
}

/// An operation array, also accepting `{}`: Lua JSON encoders (cjson) write an
/// empty table as an empty object. Errors name the offending operation's index.
pub fn operation_list<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Operation>, D::Error> {
    deserializer.deserialize_any(OperationListVisitor)
}

struct OperationListVisitor;

impl<'de> serde::de::Visitor<'de> for OperationListVisitor {
    type Value = Vec<Operation>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of operations")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ops = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        loop {
            match seq.next_element::<Operation>() {
                Ok(Some(op)) => ops.push(op),
                Ok(None) => return Ok(ops),
                Err(e) => {
                    return Err(serde::de::Error::custom(format_args!(
                        "operation {}: {e}",
                        ops.len()
                    )));
                }
            }
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        match map.next_key::<serde::de::IgnoredAny>()? {
            None => Ok(Vec::new()),
            Some(_) => Err(serde::de::Error::custom(
                "`operations` must be an array, not an object",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_client_messages_parse() {
        let sync: ClientMessage = serde_json::from_str(
            r#"{"type":"sync_request","request_id":3,"device_id":"d","since_version":5.0}"#,
        )
        .unwrap();
        assert!(matches!(
            sync,
            ClientMessage::SyncRequest {
                since_version: 5,
                limit: None,
                ..
            }
        ));
        let push: ClientMessage = serde_json::from_str(
            r#"{"type":"push_operations","request_id":4,"device_id":"d","operations":{}}"#,
        )
        .unwrap();
        assert!(
            matches!(push, ClientMessage::PushOperations { ref operations, .. } if operations.is_empty())
        );
    }

    #[test]
    fn server_messages_keep_the_old_shapes() {
        let ok: ServerMessage = ServerMessage::AuthOk { compression: None };
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"type":"auth_ok"}"#);
        assert_eq!(
            serde_json::from_str::<ServerMessage>(r#"{"type":"auth_ok"}"#).unwrap(),
            ok
        );
        let push: ServerMessage = ServerMessage::PushResponse {
            request_id: Some(RequestId::Int(7)),
            response: PushResponse {
                success: true,
                conflicts: vec![],
                version: 3,
                extra: Map::new(),
            },
        };
        let text = serde_json::to_string(&push).unwrap();
        assert_eq!(
            text,
            r#"{"type":"push_response","request_id":7,"success":true,"conflicts":[],"version":3}"#
        );
        assert_eq!(serde_json::from_str::<ServerMessage>(&text).unwrap(), push);
    }

    #[test]
    fn accepted_extension_reads_back() {
        let text =
            r#"{"success":true,"conflicts":[],"version":2,"accepted":[{"op_id":"a","version":2}]}"#;
        let response: PushResponse = serde_json::from_str(text).unwrap();
        assert_eq!(
            response.accepted(),
            vec![AcceptedOperation {
                op_id: "a".into(),
                version: 2
            }]
        );
    }
}
