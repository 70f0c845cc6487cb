//! Input validation. A push is checked completely before anything is written.

use axum::http::StatusCode;
use serde::Deserialize;
use sync_core::patch;
use sync_core::wire::operation_list;
use sync_core::Operation;
use thiserror::Error;

use crate::config::Limits;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("too many operations in one push: {count} (limit {limit})")]
    TooManyOperations { count: usize, limit: usize },
    #[error("device_id is required")]
    MissingDevice,
    #[error("device_id must be 1 to {0} bytes without control characters")]
    BadDevice(usize),
    #[error("operation {index}: {reason}")]
    Operation { index: usize, reason: String },
    #[error("query parameter `{name}`: {reason}")]
    Query {
        name: &'static str,
        reason: &'static str,
    },
}

impl InvalidInput {
    pub fn status(&self) -> StatusCode {
        match self {
            InvalidInput::TooManyOperations { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A validated push.
#[derive(Debug)]
pub struct Push {
    pub device_id: String,
    pub operations: Vec<Operation>,
}

#[derive(Deserialize)]
struct PushBody {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(deserialize_with = "operation_list")]
    operations: Vec<Operation>,
}

/// Parses and checks a `POST /operations` body.
pub fn parse_push(body: &[u8], limits: &Limits) -> Result<Push, InvalidInput> {
    check_depth(body, limits.max_json_depth)?;
    let parsed: PushBody =
        serde_json::from_slice(body).map_err(|e| InvalidInput::Json(e.to_string()))?;
    check_push(parsed.device_id, parsed.operations, limits)
}

/// Checks a push's device id and operations (shared by HTTP and WebSocket).
pub fn check_push(
    device_id: Option<String>,
    operations: Vec<Operation>,
    limits: &Limits,
) -> Result<Push, InvalidInput> {
    let device_id = device_id.ok_or(InvalidInput::MissingDevice)?;
    check_device(&device_id, limits)?;
    if operations.len() > limits.max_operations_per_push {
        return Err(InvalidInput::TooManyOperations {
            count: operations.len(),
            limit: limits.max_operations_per_push,
        });
    }
    for (index, op) in operations.iter().enumerate() {
        check_operation(op, limits).map_err(|reason| InvalidInput::Operation { index, reason })?;
    }
    Ok(Push {
        device_id,
        operations,
    })
}

pub fn check_device(device_id: &str, limits: &Limits) -> Result<(), InvalidInput> {
    if device_id.is_empty() {
        return Err(InvalidInput::MissingDevice);
    }
    if device_id.len() > limits.max_id_bytes || device_id.chars().any(char::is_control) {
        return Err(InvalidInput::BadDevice(limits.max_id_bytes));
    }
    Ok(())
}

fn check_operation(op: &Operation, limits: &Limits) -> Result<(), String> {
    if op.id.is_empty() || op.id.len() > limits.max_id_bytes || op.id.chars().any(char::is_control)
    {
        return Err(format!(
            "id must be 1 to {} bytes without control characters",
            limits.max_id_bytes
        ));
    }
    check_story_id(&op.story_id, limits.max_story_id_bytes)?;
    // Whether a patch applies is decided when it is stored.
    if patch::is_patched(op) {
        if let Some(problem) = patch::shape_problem(op) {
            return Err(problem.to_owned());
        }
    }
    Ok(())
}

/// Story ids become file names on clients, so anything that could escape a
/// directory is refused; a leading `_` is reserved for sync bookkeeping
/// (`_whisker_sync_state`).
pub fn check_story_id(id: &str, max_bytes: usize) -> Result<(), String> {
    let problem = if id.is_empty() {
        "story_id must not be empty"
    } else if id.len() > max_bytes {
        return Err(format!("story_id is longer than {max_bytes} bytes"));
    } else if id.contains(['/', '\\']) {
        "story_id must not contain path separators"
    } else if id.contains("..") {
        "story_id must not contain `..`"
    } else if id.chars().any(char::is_control) {
        "story_id must not contain control characters"
    } else if id.starts_with('_') {
        "story_id must not start with `_` (reserved)"
    } else {
        return Ok(());
    };
    Err(problem.to_owned())
}

/// Fails when arrays and objects nest deeper than `limit`, checked on the raw
/// text before parsing so a hostile body cannot exhaust the parser.
pub fn check_depth(json: &[u8], limit: usize) -> Result<(), InvalidInput> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(InvalidInput::TooDeep(limit));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A non-negative whole-number query parameter; `5.0` is accepted (Lua 5.1
/// clients have no integers).
pub fn whole_number(name: &'static str, text: &str) -> Result<u64, InvalidInput> {
    let bad = InvalidInput::Query {
        name,
        reason: "must be a non-negative whole number",
    };
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
            Ok(f as u64)
        }
        _ => Err(bad),
    }
}

/// A yes/no query parameter: `1` or `true` is yes, `0` or `false` no.
pub fn flag(name: &'static str, text: &str) -> Result<bool, InvalidInput> {
    match text {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(InvalidInput::Query {
            name,
            reason: "must be 1, true, 0 or false",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn story_ids() {
        assert!(check_story_id("story-1", 256).is_ok());
        assert!(check_story_id("Ünïcode story", 256).is_ok());
        for bad in [
            "",
            "a/b",
            "a\\b",
            "..",
            "x..y",
            "a\nb",
            "_whisker_sync_state",
            "a\u{7f}",
        ] {
            assert!(check_story_id(bad, 256).is_err(), "{bad:?} accepted");
        }
        assert!(check_story_id(&"a".repeat(257), 256).is_err());
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert!(check_depth(br#"{"a":"[[[[[[["}"#, 2).is_ok());
        assert!(check_depth(br#"{"a":"\"[[[["}"#, 2).is_ok());
        assert_eq!(
            check_depth(br#"{"a":[[1]]}"#, 2),
            Err(InvalidInput::TooDeep(2))
        );
    }

    #[test]
    fn push_accepts_the_old_empty_table() {
        let push = parse_push(br#"{"device_id":"d","operations":{}}"#, &Limits::default()).unwrap();
        assert!(push.operations.is_empty());
    }

    #[test]
    fn push_errors_name_the_operation() {
        let body = br#"{"device_id":"d","operations":[
            {"id":"a","type":"create","story_id":"s","timestamp":1},
            {"id":"b","type":"create","story_id":"../x","timestamp":1}]}"#;
        let err = parse_push(body, &Limits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "operation 1: story_id must not contain path separators"
        );
        let missing =
            br#"{"device_id":"d","operations":[{"id":"a","type":"create","story_id":"s"}]}"#;
        let err = parse_push(missing, &Limits::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("operation 0: missing field `timestamp`"),
            "{err}"
        );
    }

    #[test]
    fn patched_updates_must_be_well_formed() {
        let push = |op: &str| {
            let body = format!(r#"{{"device_id":"d","operations":[{op}]}}"#);
            parse_push(body.as_bytes(), &Limits::default()).map(|_| ())
        };
        assert_eq!(
            push(
                r#"{"id":"a","type":"update","story_id":"s","timestamp":1,"base_version":3,
                    "patch":[],"content_hash":"h"}"#
            ),
            Ok(())
        );
        for (op, reason) in [
            (
                r#"{"id":"a","type":"create","story_id":"s","timestamp":1,"base_version":3,"patch":[],"content_hash":"h"}"#,
                "patch is only allowed on update operations",
            ),
            (
                r#"{"id":"a","type":"update","story_id":"s","timestamp":1,"base_version":3,"patch":[],"content_hash":"h","data":{}}"#,
                "an update with a patch must not also carry data",
            ),
            (
                r#"{"id":"a","type":"update","story_id":"s","timestamp":1,"patch":[],"content_hash":"h"}"#,
                "an update with a patch needs base_version",
            ),
            (
                r#"{"id":"a","type":"update","story_id":"s","timestamp":1,"base_version":3,"patch":{},"content_hash":"h"}"#,
                "patch must be an array",
            ),
            (
                r#"{"id":"a","type":"update","story_id":"s","timestamp":1,"base_version":3,"patch":[]}"#,
                "an update with a patch needs a string content_hash",
            ),
        ] {
            assert_eq!(
                push(op).unwrap_err().to_string(),
                format!("operation 0: {reason}")
            );
        }
    }

    #[test]
    fn too_many_operations_is_413() {
        let limits = Limits {
            max_operations_per_push: 1,
            ..Limits::default()
        };
        let body = br#"{"device_id":"d","operations":[
            {"id":"a","type":"create","story_id":"s","timestamp":1},
            {"id":"b","type":"create","story_id":"t","timestamp":1}]}"#;
        let err = parse_push(body, &limits).unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn numbers() {
        assert_eq!(whole_number("since", "5"), Ok(5));
        assert_eq!(whole_number("since", "5.0"), Ok(5));
        assert!(whole_number("since", "-1").is_err());
        assert!(whole_number("since", "1.5").is_err());
        assert!(whole_number("since", "abc").is_err());
    }

    #[test]
    fn flags() {
        assert_eq!(flag("patches", "1"), Ok(true));
        assert_eq!(flag("patches", "true"), Ok(true));
        assert_eq!(flag("patches", "0"), Ok(false));
        assert_eq!(flag("patches", "false"), Ok(false));
        for bad in ["maybe", "", "yes", "TRUE", "2"] {
            assert!(flag("patches", bad).is_err(), "{bad:?} accepted");
        }
    }
}
