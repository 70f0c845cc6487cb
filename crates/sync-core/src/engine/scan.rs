//! Finding local changes, and checking what the server sends.

use std::collections::{BTreeMap, BTreeSet};

use crate::protocol::{now_seconds, OpType, Operation};
use crate::state::{StateManager, StateStore};
use crate::value::{Map, Value};

use super::bases::BaseStore;
use super::{
    content_hash, effective_content, is_reserved, EngineConfig, Host, Progress, Step, Storage,
    SyncError,
};

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
    pub dirty: &'a BTreeSet<String>,
}

pub(super) struct Scanned {
    /// Operations for the changes found, to be queued.
    pub new_ops: Vec<Operation>,
    /// Content of the stories read (`None`: listed but gone).
    pub current: BTreeMap<String, Option<Value>>,
}

/// Compares local stories with what the state knows (the last synced version,
/// or the latest queued change) and makes an operation for each difference.
pub(super) fn collect<S: StateStore>(
    config: &EngineConfig,
    storage: &mut dyn Storage,
    state: &mut StateManager<S>,
    bases: &mut BaseStore,
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
        current: BTreeMap::new(),
    };
    let mut listed = BTreeSet::new();
    let total = entries.len();
    for (done, entry) in entries.into_iter().enumerate() {
        if is_reserved(&entry.id) || validate_story_id(&entry.id).is_err() {
            continue;
        }
        listed.insert(entry.id.clone());
        let known = state.baseline(&entry.id).map(|b| b.hash.clone());
        let pending = queued.get(&entry.id);
        if !scope.full && !scope.dirty.contains(&entry.id) && (known.is_some() || pending.is_some())
        {
            continue;
        }
        if done % 64 == 0 {
            host.progress(Progress {
                step: Step::CollectingLocal,
                done,
                total,
            });
        }
        let Some(content) = storage.load(&entry.id)? else {
            continue;
        };
        let previous = match pending {
            Some(ops) => expected_content(state, bases, &entry.id, ops)?,
            None => match &known {
                Some(hash) => Some(bases.get(state, &entry.id, hash)?),
                None => None,
            },
        };
        let hash = content_hash(Some(&content));
        let expected_hash = match (&previous, pending, &known) {
            (Some(p), _, _) => Some(content_hash(p.as_ref())),
            (None, None, Some(h)) => Some(h.clone()),
            _ => None,
        };
        if expected_hash.as_deref() != Some(hash.as_str()) {
            let never_synced = known.is_none() && pending.is_none();
            let op = change_op(
                &entry.id,
                &content,
                previous.flatten().as_ref(),
                never_synced,
                entry.updated_at,
            );
            scanned.new_ops.push(Operation {
                device_id: config.device_id.clone(),
                ..op
            });
        }
        scanned.current.insert(entry.id, Some(content));
    }
    let tracked: BTreeSet<String> = state
        .baselines()
        .keys()
        .chain(queued.keys())
        .filter(|id| !listed.contains(*id))
        .cloned()
        .collect();
    for id in tracked {
        let latest = queued.get(&id).and_then(|ops| ops.last());
        if latest.is_some_and(|op| op.op_type == OpType::Delete) {
            continue;
        }
        let mut op = Operation::new(OpType::Delete, id.clone(), None);
        op.device_id = config.device_id.clone();
        scanned.new_ops.push(op);
        scanned.current.insert(id, None);
    }
    Ok(scanned)
}

/// The operation recording a change to `content` from `previous`.
fn change_op(
    id: &str,
    content: &Value,
    previous: Option<&Value>,
    never_synced: bool,
    updated_at: Option<i64>,
) -> Operation {
    if let Some(metadata) = metadata_only_change(previous, content) {
        let mut op = Operation::new(OpType::MetadataUpdate, id, metadata);
        op.timestamp = updated_at.unwrap_or_else(now_seconds);
        return op;
    }
    let op_type = if never_synced {
        OpType::Create
    } else {
        OpType::Update
    };
    let mut op = Operation::new(op_type, id, Some(content.clone()));
    // A story never synced here has no edit time of its own unless the storage
    // records one; it then loses last-write-wins to any remote version.
    op.timestamp = updated_at.unwrap_or(if never_synced { 0 } else { now_seconds() });
    op
}

/// `Some(new metadata)` when `content` differs from `previous` only in its
/// `metadata` member.
fn metadata_only_change(previous: Option<&Value>, content: &Value) -> Option<Option<Value>> {
    let (Some(Value::Object(before)), Value::Object(after)) = (previous, content) else {
        return None;
    };
    let without = |story: &Map| {
        let mut story = story.clone();
        story.remove("metadata");
        story
    };
    (before.get("metadata") != after.get("metadata") && without(before) == without(after))
        .then(|| after.get("metadata").cloned())
}

/// The content a story has once its queued operations apply: `None` when the
/// queue holds a metadata update whose starting content is unknown.
fn expected_content<S: StateStore>(
    state: &mut StateManager<S>,
    bases: &mut BaseStore,
    id: &str,
    ops: &[Operation],
) -> Result<Option<Option<Value>>, SyncError> {
    let start = ops
        .iter()
        .rposition(|op| op.op_type != OpType::MetadataUpdate);
    let mut content = match start {
        Some(i) => effective_content(&ops[i], None).unwrap_or_default(),
        None => match state.baseline(id).map(|b| b.hash.clone()) {
            Some(hash) => match bases.get(state, id, &hash)? {
                Some(base) => Some(base),
                None => return Ok(None),
            },
            None => return Ok(None),
        },
    };
    for op in &ops[start.map_or(0, |i| i + 1)..] {
        content = effective_content(op, content.as_ref()).unwrap_or(content);
    }
    Ok(Some(content))
}

/// Reads an operation the server sent, rejecting anything malformed.
pub(super) fn parse_remote(value: &Value) -> Result<Operation, String> {
    let Value::Object(fields) = value else {
        return Err("not an object".into());
    };
    let text = |name: &str| match fields.get(name) {
        Some(Value::Str(s)) => Ok(Some(s.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(format!("{name} must be a string")),
    };
    let count = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .and_then(|n| u64::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("{name} must be a non-negative integer")),
    };
    let id = text("id")?.ok_or("id is missing")?;
    let type_name = text("type")?.ok_or("type is missing")?;
    let op_type =
        OpType::parse(&type_name).ok_or_else(|| format!("unknown type \"{type_name}\""))?;
    let story_id = text("story_id")?.ok_or("story_id is missing")?;
    validate_story_id(&story_id)?;
    let data = match fields.get("data") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(Value::Array(items)) if items.is_empty() => Some(Value::empty_object()),
        Some(_) => return Err("data must be a table".into()),
    };
    if matches!(op_type, OpType::Create | OpType::Update) && data.is_none() {
        return Err(format!("a {} has no data", op_type.as_str()));
    }
    let timestamp = match fields.get("timestamp") {
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite())
            .ok_or("timestamp must be a number")?
            .floor() as i64,
        None => 0,
    };
    let metadata = match fields.get("metadata") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    const KNOWN: [&str; 9] = [
        "id",
        "type",
        "story_id",
        "data",
        "metadata",
        "timestamp",
        "device_id",
        "version",
        "base_version",
    ];
    let extra = fields
        .iter()
        .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Operation {
        id,
        op_type,
        story_id,
        data: if op_type == OpType::Delete {
            None
        } else {
            data
        },
        metadata,
        timestamp,
        device_id: text("device_id")?.unwrap_or_else(|| "unknown".into()),
        base_version: count("base_version")?,
        version: count("version")?,
        extra,
    })
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
        let parse = |text: &str| parse_remote(&serde_json::from_str(text).unwrap());
        let op = parse(r#"{"id":"1","type":"UPDATE","story_id":"s","data":{"t":1},"timestamp":5.5,"version":3}"#).unwrap();
        assert_eq!(
            (op.op_type, op.timestamp, op.version, op.device_id.as_str()),
            (OpType::Update, 5, Some(3), "unknown")
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"update","story_id":"../etc","data":{}}"#).unwrap_err(),
            "story id \"../etc\" contains a path separator or '..'"
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"update","story_id":"s"}"#).unwrap_err(),
            "a update has no data"
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"rename","story_id":"s"}"#).unwrap_err(),
            "unknown type \"rename\""
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"update","story_id":"s","data":"x"}"#).unwrap_err(),
            "data must be a table"
        );
        assert_eq!(
            parse(r#"{"id":"1","type":"delete","story_id":"s","version":-1}"#).unwrap_err(),
            "version must be a non-negative integer"
        );
        assert_eq!(parse(r#"[1]"#).unwrap_err(), "not an object");
    }

    #[test]
    fn metadata_only_changes_are_recognised() {
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let before = json(r#"{"title":"T","metadata":{"tags":["a"]}}"#);
        let after = json(r#"{"title":"T","metadata":{"tags":["b"]}}"#);
        assert_eq!(
            metadata_only_change(Some(&before), &after),
            Some(Some(json(r#"{"tags":["b"]}"#)))
        );
        let edited = json(r#"{"title":"T2","metadata":{"tags":["b"]}}"#);
        assert_eq!(metadata_only_change(Some(&before), &edited), None);
        assert_eq!(metadata_only_change(None, &after), None);
    }
}
