//! Finding local changes, and checking what the server sends.

use std::collections::{BTreeMap, BTreeSet};

use crate::protocol::{now_seconds, OpType, Operation};
use crate::state::{StateManager, StateStore};
use crate::value::{Map, Value};

use super::{
    body_part, content_hash, is_reserved, queued_change, queued_hash, story_tags, EngineConfig,
    Host, Progress, Step, Storage, StoryFilter, SyncError,
};
use crate::patch;

/// Longest story id accepted, in bytes.
const MAX_ID_LEN: usize = 255;

/// Checks a story id before it reaches storage: story ids become file names in
/// whisker-core's filesystem backend, so an id from elsewhere must not be able
/// to name another place (`../x`), hide (`_` is reserved for sync state), or
/// carry control characters.
pub fn validate_story_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("story id is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("story id is longer than {MAX_ID_LEN} bytes"));
    }
    if is_reserved(id) {
        return Err(format!("story id \"{id}\" starts with the reserved '_'"));
    }
    if id.contains(['/', '\\']) || id.contains("..") {
        return Err(format!("story id {id:?} contains a path separator or '..'"));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("story id {id:?} contains a control character"));
    }
    Ok(())
}

/// Which stories a scan reads.
pub(super) struct Scope<'a> {
    /// Read every story (else only `dirty` ones, new ones and deleted ones).
    pub full: bool,
    /// Read every story even when the storage's `updated_at` says it is
    /// unchanged (a periodic check for writers that do not update it).
    pub deep: bool,
    pub dirty: &'a BTreeSet<String>,
}

/// Seconds an `updated_at` must lie in the past before it is trusted: a
/// story saved again within the same second keeps its `updated_at`.
const SETTLED_SECONDS: i64 = 2;

pub(super) struct Scanned {
    /// Operations for the changes found, to be queued.
    pub new_ops: Vec<Operation>,
    /// The operations already queued, by story, oldest first.
    pub queued: BTreeMap<String, Vec<Operation>>,
    /// Content hashes of the stories looked at (`"deleted"`: listed but gone).
    pub hashes: BTreeMap<String, String>,
    /// Stories read whose `updated_at` can stand for their content (see
    /// [`SETTLED_SECONDS`]).
    pub times: Vec<ReadAt>,
}

/// A story's `updated_at` and the content hash read with it.
pub(super) struct ReadAt {
    pub id: String,
    pub updated_at: i64,
    pub hash: String,
}

/// Compares local stories with what the state knows (the last synced version,
/// or the latest queued change) by content hash, and makes an operation for
/// each difference.
pub(super) fn collect<S: StateStore>(
    config: &EngineConfig,
    filter: &StoryFilter,
    storage: &mut dyn Storage,
    state: &StateManager<S>,
    scope: Scope<'_>,
    host: &mut dyn Host,
) -> Result<Scanned, SyncError> {
    let entries = storage.list()?;
    let mut queued: BTreeMap<String, Vec<Operation>> = BTreeMap::new();
    for op in state.pending_operations() {
        queued.entry(op.story_id.clone()).or_default().push(op);
    }
    let mut scanned = Scanned {
        new_ops: Vec::new(),
        queued: BTreeMap::new(),
        hashes: BTreeMap::new(),
        times: Vec::new(),
    };
    let mut listed = BTreeSet::new();
    let total = entries.len();
    for (done, entry) in entries.into_iter().enumerate() {
        if is_reserved(&entry.id) || validate_story_id(&entry.id).is_err() {
            continue;
        }
        listed.insert(entry.id.clone());
        let admitted = match filter.admits_id(&entry.id) {
            Some(admitted) => admitted,
            None => match &entry.tags {
                Some(tags) => filter.admits_tags(tags.iter().map(String::as_str)),
                None => storage
                    .load(&entry.id)?
                    .is_some_and(|story| filter.admits_tags(story_tags(&story))),
            },
        };
        if !admitted {
            continue;
        }
        let baseline = state.baseline(&entry.id).map(|b| b.hash.as_str());
        let pending = queued.get(&entry.id);
        let known = expected_hash(baseline, pending.map_or(&[][..], Vec::as_slice));
        let dirty = scope.dirty.contains(&entry.id);
        let recorded_time = state.baseline(&entry.id).and_then(|b| b.updated_at);
        // The storage's `updated_at` tells whether a story changed, also across
        // processes (an editor saving while `whisker sync start` runs); events
        // tell it within this process when there is no `updated_at`.
        let unchanged = match entry.updated_at {
            Some(time) => !scope.deep && !dirty && pending.is_none() && recorded_time == Some(time),
            None => !scope.full && !dirty,
        };
        if unchanged && known.is_some() {
            continue;
        }
        if done % 64 == 0 {
            host.progress(Progress {
                step: Step::CollectingLocal,
                done,
                total,
            });
        }
        let Some(hash) = storage.hash(&entry.id)? else {
            continue;
        };
        if known.as_deref() != Some(hash.as_str()) {
            let metadata_only = known
                .as_deref()
                .is_some_and(|k| k != "deleted" && body_part(k) == body_part(&hash));
            let never_synced = baseline.is_none() && pending.is_none();
            let op = if metadata_only {
                let metadata = storage
                    .load(&entry.id)?
                    .and_then(|story| story.get("metadata").cloned());
                metadata_update(&entry.id, metadata, entry.updated_at)
            } else {
                change_op(&entry.id, hash.clone(), never_synced, entry.updated_at)
            };
            scanned.new_ops.push(Operation {
                device_id: config.device_id.clone(),
                ..op
            });
        }
        if let Some(time) = entry
            .updated_at
            .filter(|t| *t <= now_seconds() - SETTLED_SECONDS)
        {
            scanned.times.push(ReadAt {
                id: entry.id.clone(),
                updated_at: time,
                hash: hash.clone(),
            });
        }
        scanned.hashes.insert(entry.id, hash);
    }
    let tracked: BTreeSet<String> = state
        .baselines()
        .keys()
        .chain(queued.keys())
        .filter(|id| !listed.contains(*id))
        .cloned()
        .collect();
    for id in tracked {
        if filter.admits_id(&id) == Some(false) {
            continue;
        }
        let latest = queued.get(&id).and_then(|ops| ops.last());
        if latest.is_some_and(|op| op.op_type == OpType::Delete) {
            continue;
        }
        let mut op = Operation::new(OpType::Delete, id.clone(), None);
        op.device_id = config.device_id.clone();
        scanned.new_ops.push(op);
        scanned.hashes.insert(id, content_hash(None));
    }
    scanned.queued = queued;
    Ok(scanned)
}

/// The content hash a story has once its queued operations apply to its
/// baseline; `None` when nothing is known of it.
fn expected_hash(baseline: Option<&str>, queued: &[Operation]) -> Option<String> {
    queued
        .iter()
        .fold(baseline.map(str::to_owned), |hash, op| match op.op_type {
            OpType::Create | OpType::Update => Some(queued_hash(op)),
            OpType::Delete => Some(content_hash(None)),
            OpType::MetadataUpdate => {
                let body = body_part(hash.as_deref()?).to_owned();
                let story = Value::Object(match &op.data {
                    Some(metadata) => Map::from([("metadata".to_owned(), metadata.clone())]),
                    None => Map::new(),
                });
                let hash = content_hash(Some(&story));
                Some(match hash.split_once(':') {
                    Some((_, meta)) => format!("{body}:{meta}"),
                    None => body,
                })
            }
        })
}

/// The queued operation for a story whose content now hashes to `hash`.
fn change_op(id: &str, hash: String, never_synced: bool, updated_at: Option<i64>) -> Operation {
    let op_type = if never_synced {
        OpType::Create
    } else {
        OpType::Update
    };
    let mut op = queued_change(op_type, id, Some(hash));
    // A story never synced here has no edit time of its own unless the storage
    // records one; it then loses last-write-wins to any remote version.
    op.timestamp = updated_at.unwrap_or(if never_synced { 0 } else { now_seconds() });
    op
}

/// The queued operation for a change to a story's metadata alone.
fn metadata_update(id: &str, metadata: Option<Value>, updated_at: Option<i64>) -> Operation {
    let mut op = Operation::new(OpType::MetadataUpdate, id, metadata);
    op.timestamp = updated_at.unwrap_or_else(now_seconds);
    op
}

/// Reads an operation the server sent, rejecting anything malformed.
pub(super) fn parse_remote(value: Value) -> Result<Operation, String> {
    let mut op = Operation::from_document(value)?;
    validate_story_id(&op.story_id)?;
    match (&op.data, op.op_type) {
        (Some(Value::Array(items)), _) if items.is_empty() => op.data = Some(Value::empty_object()),
        (Some(Value::Object(_)) | None, _) => {}
        (Some(_), OpType::Delete) => op.data = None,
        (Some(_), _) => return Err("data must be a table".into()),
    }
    if patch::is_patched(&op) {
        if let Some(problem) = patch::shape_problem(&op) {
            return Err(format!("a patched operation is malformed: {problem}"));
        }
    } else if matches!(op.op_type, OpType::Create | OpType::Update) && op.data.is_none() {
        return Err(format!("a {} has no data", op.op_type.as_str()));
    }
    if op.op_type == OpType::Delete {
        op.data = None;
    }
    if op.device_id.is_empty() {
        op.device_id = "unknown".into();
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn story_ids_that_could_escape_or_hide_are_rejected() {
        for bad in [
            "",
            "../x",
            "a/b",
            "a\\b",
            "..",
            "x..y",
            "_whisker_sync_state",
            "a\nb",
            "a\u{7f}",
        ] {
            assert!(validate_story_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["story-1", "My Story", "chapter.1", "évasion"] {
            assert!(validate_story_id(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn remote_operations_are_checked() {
        let parse = |text: &str| parse_remote(serde_json::from_str(text).unwrap());
        let op = parse(r#"{"id":"1","type":"UPDATE","story_id":"s","data":{"t":1},"timestamp":5.5,"version":3}"#).unwrap();
        assert_eq!(
            (op.op_type, op.timestamp, op.version, op.device_id.as_str()),
            (OpType::Update, 5, Some(3), "unknown")
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"update","story_id":"../etc","data":{},"timestamp":1}"#)
                .unwrap_err(),
            "story id \"../etc\" contains a path separator or '..'"
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"update","story_id":"s","timestamp":1}"#).unwrap_err(),
            "a update has no data"
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"rename","story_id":"s","timestamp":1}"#).unwrap_err(),
            "unknown type \"rename\""
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"update","story_id":"s","data":"x","timestamp":1}"#)
                .unwrap_err(),
            "data must be a table"
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"delete","story_id":"s","version":-1,"timestamp":1}"#)
                .unwrap_err(),
            "version must be a non-negative integer"
        );
        assert_eq!(parse(r#"[1]"#).unwrap_err(), "not an object");
    }

    #[test]
    fn patched_updates_are_checked() {
        let parse = |text: &str| parse_remote(serde_json::from_str(text).unwrap());
        let op = parse(
            r#"{"id":"1","type":"update","story_id":"s","timestamp":1,"base_version":4,
                "patch":[{"op":"replace","path":"/t","value":2}],"content_hash":"h"}"#,
        )
        .unwrap();
        assert!(op.data.is_none() && patch::is_patched(&op));
        for bad in [
            r#"{"id":"1","type":"update","story_id":"s","timestamp":1,"patch":[],"content_hash":"h"}"#,
            r#"{"id":"1","type":"update","story_id":"s","timestamp":1,"base_version":4,"patch":{},"content_hash":"h"}"#,
            r#"{"id":"1","type":"update","story_id":"s","timestamp":1,"base_version":4,"patch":[]}"#,
            r#"{"id":"1","type":"create","story_id":"s","timestamp":1,"base_version":4,"patch":[],"content_hash":"h"}"#,
            r#"{"id":"1","type":"update","story_id":"s","timestamp":1,"base_version":4,"patch":[],"content_hash":"h","data":{}}"#,
        ] {
            assert!(
                parse(bad).unwrap_err().starts_with("a patched operation"),
                "{bad}"
            );
        }
    }

    #[test]
    fn queued_operations_give_the_expected_hash() {
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let story = json(r#"{"title":"T","metadata":{"tags":["a"]}}"#);
        let retagged = json(r#"{"title":"T","metadata":{"tags":["b"]}}"#);
        let base = content_hash(Some(&story));
        let op = |t, data| Operation::new(t, "s", data);
        let tags = op(OpType::MetadataUpdate, Some(json(r#"{"tags":["b"]}"#)));
        assert_eq!(
            expected_hash(Some(&base), &[tags]),
            Some(content_hash(Some(&retagged)))
        );
        assert_eq!(body_part(&base), body_part(&content_hash(Some(&retagged))));
        let update = op(OpType::Update, Some(retagged.clone()));
        let delete = op(OpType::Delete, None);
        assert_eq!(
            expected_hash(None, std::slice::from_ref(&update)),
            Some(content_hash(Some(&retagged)))
        );
        assert_eq!(
            expected_hash(Some(&base), &[update, delete]),
            Some("deleted".to_owned())
        );
        assert_eq!(expected_hash(None, &[]), None);
    }
}
