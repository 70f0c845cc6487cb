//! The sync protocol: operations, conflict detection and resolution, state deltas.
//!
//! Everything here is pure and deterministic: the same inputs give the same
//! outputs on every replica, which is what lets replicas converge.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{SystemTime, UNIX_EPOCH};

use foldhash::fast::RandomState;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::value::{Map, Value};

/// Errors of the protocol's public functions. The messages are part of the Lua
/// API (the old implementation raised the same strings).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("Manual strategy requires resolver_fn")]
    ManualNeedsResolver,
    #[error("Unknown conflict strategy: {0}")]
    UnknownStrategy(String),
}

/// The kind of change an operation carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpType {
    Create,
    Update,
    Delete,
    MetadataUpdate,
}

impl OpType {
    pub const ALL: [OpType; 4] = [
        OpType::Create,
        OpType::Update,
        OpType::Delete,
        OpType::MetadataUpdate,
    ];

    /// The wire and Lua spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OpType::Create => "create",
            OpType::Update => "update",
            OpType::Delete => "delete",
            OpType::MetadataUpdate => "metadata_update",
        }
    }

    /// The constant name in `Protocol.OperationType`.
    pub fn constant_name(self) -> &'static str {
        match self {
            OpType::Create => "CREATE",
            OpType::Update => "UPDATE",
            OpType::Delete => "DELETE",
            OpType::MetadataUpdate => "METADATA_UPDATE",
        }
    }

    /// Parses a type, ignoring ASCII case: old callers and docs also write `"UPDATE"`.
    pub fn parse(s: &str) -> Option<OpType> {
        OpType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

impl Serialize for OpType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for OpType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        OpType::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown operation type \"{s}\"")))
    }
}

/// How a conflict is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictStrategy {
    LastWriteWins,
    Manual,
    AutoMerge,
    KeepBoth,
}

impl ConflictStrategy {
    pub const ALL: [ConflictStrategy; 4] = [
        ConflictStrategy::LastWriteWins,
        ConflictStrategy::Manual,
        ConflictStrategy::AutoMerge,
        ConflictStrategy::KeepBoth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConflictStrategy::LastWriteWins => "last_write_wins",
            ConflictStrategy::Manual => "manual",
            ConflictStrategy::AutoMerge => "auto_merge",
            ConflictStrategy::KeepBoth => "keep_both",
        }
    }

    pub fn constant_name(self) -> &'static str {
        match self {
            ConflictStrategy::LastWriteWins => "LAST_WRITE_WINS",
            ConflictStrategy::Manual => "MANUAL",
            ConflictStrategy::AutoMerge => "AUTO_MERGE",
            ConflictStrategy::KeepBoth => "KEEP_BOTH",
        }
    }

    pub fn parse(s: &str) -> Result<ConflictStrategy, ProtocolError> {
        ConflictStrategy::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ProtocolError::UnknownStrategy(s.to_owned()))
    }
}

/// What kind of concurrent change a conflict is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictType {
    ConcurrentUpdate,
    DeleteUpdate,
    UpdateDelete,
    Unknown,
}

impl ConflictType {
    pub fn of(local: Option<OpType>, remote: Option<OpType>) -> ConflictType {
        use OpType::{Delete, Update};
        match (local, remote) {
            (Some(Update), Some(Update)) => ConflictType::ConcurrentUpdate,
            (Some(Delete), Some(Update)) => ConflictType::DeleteUpdate,
            (Some(Update), Some(Delete)) => ConflictType::UpdateDelete,
            _ => ConflictType::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConflictType::ConcurrentUpdate => "concurrent_update",
            ConflictType::DeleteUpdate => "delete_update_conflict",
            ConflictType::UpdateDelete => "update_delete_conflict",
            ConflictType::Unknown => "unknown",
        }
    }
}

/// One change to one story, as stored, queued and sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    #[serde(rename = "type")]
    pub op_type: OpType,
    pub story_id: String,
    /// Full story for create/update, metadata for metadata_update, absent for delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map,
    /// Edit time, Unix seconds.
    #[serde(deserialize_with = "seconds")]
    pub timestamp: i64,
    #[serde(default)]
    pub device_id: String,
    /// The server version of this story the change was made on (absent from old clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// Server-assigned sequence number, present once the server accepted the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Fields this version does not know, carried through unchanged.
    #[serde(flatten)]
    pub extra: Map,
}

impl Operation {
    /// A new operation with a fresh id, stamped now.
    pub fn new(op_type: OpType, story_id: impl Into<String>, data: Option<Value>) -> Self {
        Operation {
            id: new_operation_id(),
            op_type,
            story_id: story_id.into(),
            data,
            metadata: Map::new(),
            timestamp: now_seconds(),
            device_id: String::new(),
            base_version: None,
            version: None,
            extra: Map::new(),
        }
    }

    /// The operation as a document, with the fields and omissions of its JSON form.
    pub fn to_value(&self) -> Value {
        let mut fields = self.extra.clone();
        fields.insert("id".into(), Value::from(self.id.as_str()));
        fields.insert("type".into(), Value::from(self.op_type.as_str()));
        fields.insert("story_id".into(), Value::from(self.story_id.as_str()));
        if let Some(data) = &self.data {
            fields.insert("data".into(), data.clone());
        }
        if !self.metadata.is_empty() {
            fields.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        fields.insert("timestamp".into(), Value::Int(self.timestamp));
        fields.insert("device_id".into(), Value::from(self.device_id.as_str()));
        let count = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
        if let Some(base) = self.base_version {
            fields.insert("base_version".into(), count(base));
        }
        if let Some(version) = self.version {
            fields.insert("version".into(), count(version));
        }
        Value::Object(fields)
    }

    /// Reads an operation from a document: `id`, `type`, `story_id` and a
    /// numeric `timestamp` are required, the rest as in the JSON form.
    pub fn from_value(value: &Value) -> Result<Operation, String> {
        Self::from_document(value.clone())
    }

    /// [`Operation::from_value`], taking the document's parts instead of copying them.
    pub fn from_document(value: Value) -> Result<Operation, String> {
        let Value::Object(mut fields) = value else {
            return Err("not an object".into());
        };
        let mut text = |name: &str| match fields.remove(name) {
            Some(Value::Str(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(format!("{name} must be a string")),
        };
        let id = text("id")?.ok_or("id is missing")?;
        let type_name = text("type")?.ok_or("type is missing")?;
        let story_id = text("story_id")?.ok_or("story_id is missing")?;
        let device_id = text("device_id")?.unwrap_or_default();
        let mut count = |name: &str| match fields.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|n| u64::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| format!("{name} must be a non-negative integer")),
        };
        let base_version = count("base_version")?;
        let version = count("version")?;
        let timestamp = fields
            .remove("timestamp")
            .ok_or("timestamp is missing")?
            .as_f64()
            .filter(|t| t.is_finite())
            .ok_or("timestamp must be a number")?;
        Ok(Operation {
            id,
            op_type: OpType::parse(&type_name)
                .ok_or_else(|| format!("unknown type \"{type_name}\""))?,
            story_id,
            data: fields.remove("data").filter(|d| !d.is_null()),
            metadata: match fields.remove("metadata") {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            },
            timestamp: timestamp.floor() as i64,
            device_id,
            base_version,
            version,
            extra: fields,
        })
    }

    /// The key this operation sorts by in last-write-wins.
    pub fn order_key(&self) -> OrderKey<'_> {
        OrderKey {
            timestamp: self.timestamp as f64,
            device_id: &self.device_id,
            op_id: &self.id,
        }
    }
}

/// Accepts integer or float seconds (Lua 5.1 and JSON decoders may give either).
fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let v = f64::deserialize(deserializer)?;
    if v.is_finite() {
        Ok(v.floor() as i64)
    } else {
        Err(serde::de::Error::custom(
            "timestamp must be a finite number",
        ))
    }
}

/// A random (OS entropy) UUID v4. The old Lua code used an unseeded `math.random`,
/// so every process on Lua 5.1/LuaJIT produced the same ids.
pub fn new_operation_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Current Unix time in whole seconds, the unit of every timestamp in the API.
pub fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Total order used by last-write-wins: timestamp, then device id, then operation
/// id. Every replica compares the same two operations the same way.
#[derive(Debug, Clone, Copy)]
pub struct OrderKey<'a> {
    pub timestamp: f64,
    pub device_id: &'a str,
    pub op_id: &'a str,
}

impl Ord for OrderKey<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.timestamp
            .total_cmp(&other.timestamp)
            .then_with(|| self.device_id.cmp(other.device_id))
            .then_with(|| self.op_id.cmp(other.op_id))
    }
}

impl PartialOrd for OrderKey<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for OrderKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for OrderKey<'_> {}

/// Which side of a conflict a decision favours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Remote,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

/// The last-write-wins winner. Identical keys (the same operation seen twice) favour local.
pub fn last_write_wins(local: &OrderKey<'_>, remote: &OrderKey<'_>) -> Side {
    match local.cmp(remote) {
        Ordering::Less => Side::Remote,
        _ => Side::Local,
    }
}

/// The parts of an operation that decide whether it conflicts with another.
#[derive(Debug, Clone, Default)]
pub struct OpHeader {
    pub op_type: Option<OpType>,
    /// Server sequence number, once accepted.
    pub version: Option<u64>,
    /// Server version of the story the change was based on.
    pub base_version: Option<u64>,
}

/// Sentinel for "no next operation" in [`SharedStories`] chains.
const END: u32 = u32::MAX;

/// Operations of one story on one side: a chain of indices into the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    first: u32,
    last: u32,
    pub len: u32,
}

impl Chain {
    fn new(i: u32) -> Self {
        Chain {
            first: i,
            last: i,
            len: 1,
        }
    }

    /// Index of the story's latest operation on this side.
    pub fn last(&self) -> usize {
        self.last as usize
    }

    fn push(&mut self, i: u32, next: &mut [u32]) {
        next[self.last as usize] = i;
        self.last = i;
        self.len += 1;
    }
}

/// A story with operations on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStory<K> {
    pub story_id: K,
    pub local: Chain,
    pub remote: Chain,
}

/// Stories present on both sides, in the order they first appear locally.
/// Indices are kept in chains rather than one vector per story, so grouping
/// allocates a fixed number of buffers whatever the number of stories.
#[derive(Debug, Clone)]
pub struct SharedStories<K> {
    pub stories: Vec<SharedStory<K>>,
    local_next: Vec<u32>,
    remote_next: Vec<u32>,
}

impl<K> SharedStories<K> {
    /// Indices of the story's local operations, oldest first.
    pub fn local_indices(&self, story: &SharedStory<K>) -> impl Iterator<Item = usize> + '_ {
        walk(story.local, &self.local_next)
    }

    /// Indices of the story's remote operations, oldest first.
    pub fn remote_indices(&self, story: &SharedStory<K>) -> impl Iterator<Item = usize> + '_ {
        walk(story.remote, &self.remote_next)
    }
}

fn walk(chain: Chain, next: &[u32]) -> impl Iterator<Item = usize> + '_ {
    std::iter::successors(Some(chain.first), move |&i| {
        Some(next[i as usize]).filter(|&n| n != END)
    })
    .map(|i| i as usize)
}

/// Groups operations by story id (one hash map, linear time) and keeps the
/// stories present on both sides.
pub fn shared_stories<K: Hash + Eq + Copy>(local: &[K], remote: &[K]) -> SharedStories<K> {
    let mut remote_next = vec![END; remote.len()];
    let mut remote_by_story: HashMap<K, Chain, RandomState> =
        HashMap::with_capacity_and_hasher(remote.len(), RandomState::default());
    for (i, id) in remote.iter().enumerate() {
        let i = i as u32;
        remote_by_story
            .entry(*id)
            .and_modify(|chain| chain.push(i, &mut remote_next))
            .or_insert_with(|| Chain::new(i));
    }
    let mut local_next = vec![END; local.len()];
    let mut stories: Vec<SharedStory<K>> = Vec::new();
    for (i, id) in local.iter().enumerate() {
        let i = i as u32;
        let Some(remote_chain) = remote_by_story.get_mut(id) else {
            continue;
        };
        // A story already taken up has its remote chain's length set to 0 and
        // points to its slot instead, which saves a second map.
        if remote_chain.len == 0 {
            stories[remote_chain.first as usize]
                .local
                .push(i, &mut local_next);
        } else {
            stories.push(SharedStory {
                story_id: *id,
                local: Chain::new(i),
                remote: *remote_chain,
            });
            *remote_chain = Chain {
                first: (stories.len() - 1) as u32,
                last: END,
                len: 0,
            };
        }
    }
    SharedStories {
        stories,
        local_next,
        remote_next,
    }
}

/// Whether the latest local and remote changes to one story conflict, and how.
///
/// They do unless they are causally ordered (one was based on a server version
/// that already included the other) or both delete the story. Without version
/// information, changes on both sides are concurrent.
pub fn conflict_between(local: &OpHeader, remote: &OpHeader) -> Option<ConflictType> {
    let saw = |x: &OpHeader, y: &OpHeader| matches!((x.base_version, y.version), (Some(base), Some(v)) if base >= v);
    let both_deleted =
        local.op_type == Some(OpType::Delete) && remote.op_type == Some(OpType::Delete);
    if saw(local, remote) || saw(remote, local) || both_deleted {
        return None;
    }
    Some(ConflictType::of(local.op_type, remote.op_type))
}

/// A conflict found by [`detect_conflicts`]: operation indices on each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictGroup<K> {
    pub story_id: K,
    pub local: Vec<usize>,
    pub remote: Vec<usize>,
    pub conflict_type: ConflictType,
}

/// Stories changed concurrently on both sides: [`shared_stories`] filtered by
/// [`conflict_between`] on each side's latest operation.
pub fn detect_conflicts<K: Hash + Eq + Copy>(
    local: &[(K, OpHeader)],
    remote: &[(K, OpHeader)],
) -> Vec<ConflictGroup<K>> {
    let local_ids: Vec<K> = local.iter().map(|(id, _)| *id).collect();
    let remote_ids: Vec<K> = remote.iter().map(|(id, _)| *id).collect();
    let shared = shared_stories(&local_ids, &remote_ids);
    shared
        .stories
        .iter()
        .filter_map(|story| {
            let l = &local[story.local.last()].1;
            let r = &remote[story.remote.last()].1;
            Some(ConflictGroup {
                story_id: story.story_id,
                local: shared.local_indices(story).collect(),
                remote: shared.remote_indices(story).collect(),
                conflict_type: conflict_between(l, r)?,
            })
        })
        .collect()
}

/// Field-by-field three-way merge of two versions of a story.
///
/// `base` is the version both sides started from, when known. A member changed
/// on one side only takes that side's value (so edits to different fields all
/// survive, and a member one side removed stays removed); objects changed on
/// both sides merge recursively; anything else changed on both sides (scalars,
/// arrays, a change of type) takes the value of `winner`, the last-write-wins
/// side. Without a base every difference counts as changed on both sides,
/// which keeps members present on one side only. The result is the same on
/// every replica. A story deleted on one side and edited on the other keeps
/// the edit: auto-merge never discards an edit.
pub fn merge(
    base: Option<&Value>,
    local: Option<&Value>,
    remote: Option<&Value>,
    winner: Side,
) -> Option<Value> {
    match (local, remote) {
        (Some(l), Some(r)) => Some(merge_values(base, l, r, winner)),
        // A deletion merged with an unchanged version is a deletion.
        (None, Some(v)) | (Some(v), None) if base == Some(v) => None,
        (Some(v), None) | (None, Some(v)) => Some(v.clone()),
        (None, None) => None,
    }
}

fn merge_values(base: Option<&Value>, local: &Value, remote: &Value, winner: Side) -> Value {
    if local == remote {
        return local.clone();
    }
    if base == Some(local) {
        return remote.clone();
    }
    if base == Some(remote) {
        return local.clone();
    }
    match (local, remote) {
        (Value::Object(l), Value::Object(r)) => {
            let base = base.and_then(Value::as_object);
            let keys: BTreeSet<&String> = l.keys().chain(r.keys()).collect();
            let merged = keys.into_iter().filter_map(|key| {
                let b = base.and_then(|b| b.get(key));
                merge(b, l.get(key), r.get(key), winner).map(|v| (key.clone(), v))
            });
            Value::Object(merged.collect())
        }
        _ => match winner {
            Side::Local => local.clone(),
            Side::Remote => remote.clone(),
        },
    }
}

/// Story ids for the two copies `keep_both` creates: distinct from each other and
/// from the original, and the same on every replica for the same conflict
/// (they are derived from the operations, not from the clock of whoever resolves).
pub fn keep_both_ids(story_id: &str, local_op_id: &str, remote_op_id: &str) -> (String, String) {
    let tag = |id: &str| {
        id.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect::<String>()
    };
    (
        format!("{story_id}-local-{}", tag(local_op_id)),
        format!("{story_id}-remote-{}", tag(remote_op_id)),
    )
}

/// A change between two states (maps from story id to story).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<K> {
    Created(K),
    Updated(K),
    Deleted(K),
}

/// The changes that turn `old` into `new`, in story-id order, comparing stories with `same`.
pub fn diff_states<K: Ord + Clone, V>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut same: impl FnMut(&V, &V) -> bool,
) -> Vec<Change<K>> {
    let mut changes = Vec::new();
    let mut old_iter = old.iter().peekable();
    let mut new_iter = new.iter().peekable();
    loop {
        match (old_iter.peek(), new_iter.peek()) {
            (Some((ok, _)), Some((nk, _))) if ok < nk => {
                changes.push(Change::Deleted((*ok).clone()));
                old_iter.next();
            }
            (Some((ok, ov)), Some((nk, nv))) if ok == nk => {
                if !same(ov, nv) {
                    changes.push(Change::Updated((*nk).clone()));
                }
                old_iter.next();
                new_iter.next();
            }
            (_, Some((nk, _))) => {
                changes.push(Change::Created((*nk).clone()));
                new_iter.next();
            }
            (Some((ok, _)), None) => {
                changes.push(Change::Deleted((*ok).clone()));
                old_iter.next();
            }
            (None, None) => return changes,
        }
    }
}

/// Operations turning `old` into `new`: create, update (full new story) and delete.
pub fn generate_delta(
    old: &BTreeMap<String, Value>,
    new: &BTreeMap<String, Value>,
) -> Vec<Operation> {
    diff_states(old, new, |a, b| a == b)
        .into_iter()
        .map(|change| match change {
            Change::Created(id) => {
                let data = new[&id].clone();
                Operation::new(OpType::Create, id, Some(data))
            }
            Change::Updated(id) => {
                let data = new[&id].clone();
                Operation::new(OpType::Update, id, Some(data))
            }
            Change::Deleted(id) => Operation::new(OpType::Delete, id, None),
        })
        .collect()
}

/// `state` with `ops` applied in order. A metadata update replaces the story's
/// `metadata` member (on a copy: the input is never modified).
pub fn apply_delta(state: &BTreeMap<String, Value>, ops: &[Operation]) -> BTreeMap<String, Value> {
    let mut next = state.clone();
    for op in ops {
        match op.op_type {
            OpType::Create | OpType::Update => match &op.data {
                Some(data) => {
                    next.insert(op.story_id.clone(), data.clone());
                }
                None => {
                    next.remove(&op.story_id);
                }
            },
            OpType::Delete => {
                next.remove(&op.story_id);
            }
            OpType::MetadataUpdate => {
                if let Some(Value::Object(story)) = next.get_mut(&op.story_id) {
                    story.insert("metadata".into(), op.data.clone().unwrap_or_default());
                }
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(story_id: &str, op_type: OpType) -> (&str, OpHeader) {
        (
            story_id,
            OpHeader {
                op_type: Some(op_type),
                ..OpHeader::default()
            },
        )
    }

    fn story(title: &str) -> Value {
        Value::Object(Map::from([("title".to_string(), Value::from(title))]))
    }

    #[test]
    fn op_types_parse_any_case() {
        assert_eq!(OpType::parse("UPDATE"), Some(OpType::Update));
        assert_eq!(
            OpType::parse("metadata_update"),
            Some(OpType::MetadataUpdate)
        );
        assert_eq!(OpType::parse("rename"), None);
    }

    #[test]
    fn unknown_strategy_names_itself() {
        let err = ConflictStrategy::parse("coin_flip").unwrap_err();
        assert_eq!(err.to_string(), "Unknown conflict strategy: coin_flip");
    }

    #[test]
    fn different_stories_do_not_conflict() {
        let local = [header("a", OpType::Update)];
        let remote = [header("b", OpType::Update)];
        assert!(detect_conflicts(&local, &remote).is_empty());
    }

    #[test]
    fn same_story_on_both_sides_conflicts() {
        let local = [header("a", OpType::Update), header("a", OpType::Delete)];
        let remote = [header("a", OpType::Update)];
        let groups = detect_conflicts(&local, &remote);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].local, vec![0, 1]);
        assert_eq!(groups[0].conflict_type, ConflictType::DeleteUpdate);
    }

    #[test]
    fn causally_ordered_changes_do_not_conflict() {
        let mut local = header("a", OpType::Update);
        local.1.base_version = Some(7);
        let mut remote = header("a", OpType::Update);
        remote.1.version = Some(7);
        assert!(detect_conflicts(&[local.clone()], &[remote.clone()]).is_empty());
        remote.1.version = Some(8);
        assert_eq!(detect_conflicts(&[local], &[remote]).len(), 1);
    }

    #[test]
    fn shared_stories_chains_every_operation_in_order() {
        let local = ["a", "b", "a", "c", "a"];
        let remote = ["c", "a", "x", "a"];
        let shared = shared_stories(&local, &remote);
        let groups: Vec<_> = shared
            .stories
            .iter()
            .map(|s| {
                let l: Vec<_> = shared.local_indices(s).collect();
                let r: Vec<_> = shared.remote_indices(s).collect();
                (s.story_id, l, r)
            })
            .collect();
        assert_eq!(
            groups,
            [("a", vec![0, 2, 4], vec![1, 3]), ("c", vec![3], vec![0])]
        );
    }

    #[test]
    fn both_deleted_is_not_a_conflict() {
        let local = [header("a", OpType::Delete)];
        let remote = [header("a", OpType::Delete)];
        assert!(detect_conflicts(&local, &remote).is_empty());
    }

    #[test]
    fn groups_follow_local_order() {
        let local = [header("z", OpType::Update), header("a", OpType::Update)];
        let remote = [header("a", OpType::Update), header("z", OpType::Update)];
        let ids: Vec<_> = detect_conflicts(&local, &remote)
            .into_iter()
            .map(|g| g.story_id)
            .collect();
        assert_eq!(ids, ["z", "a"]);
    }

    #[test]
    fn last_write_wins_is_a_total_order() {
        let a = OrderKey {
            timestamp: 10.0,
            device_id: "dev-a",
            op_id: "1",
        };
        let b = OrderKey {
            timestamp: 10.0,
            device_id: "dev-b",
            op_id: "0",
        };
        assert_eq!(last_write_wins(&a, &b), Side::Remote);
        assert_eq!(last_write_wins(&b, &a), Side::Local);
        assert_eq!(last_write_wins(&a, &a), Side::Local);
    }

    #[test]
    fn merge_keeps_fields_from_both_sides() {
        let l: Value = serde_json::from_str(r#"{"title":"L","author":"A","n":{"x":1}}"#).unwrap();
        let r: Value = serde_json::from_str(r#"{"title":"R","desc":"D","n":{"y":2}}"#).unwrap();
        let merged = merge(None, Some(&l), Some(&r), Side::Remote).unwrap();
        let expected: Value =
            serde_json::from_str(r#"{"title":"R","author":"A","desc":"D","n":{"x":1,"y":2}}"#)
                .unwrap();
        assert_eq!(merged, expected);
    }

    #[test]
    fn merge_keeps_an_edit_over_a_delete() {
        let (base, edited) = (story("base"), story("kept"));
        assert_eq!(
            merge(Some(&base), Some(&edited), None, Side::Remote),
            Some(edited.clone())
        );
        assert_eq!(merge(None, None, Some(&edited), Side::Local), Some(edited));
        assert_eq!(merge(Some(&base), None, Some(&base), Side::Remote), None);
    }

    #[test]
    fn three_way_merge_keeps_edits_to_different_fields() {
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let base = json(r#"{"title":"T","body":"B","tags":["a"],"gone":1}"#);
        let local = json(r#"{"title":"T2","body":"B","tags":["a"]}"#);
        let remote = json(r#"{"title":"T","body":"B2","tags":["a","b"],"gone":1}"#);
        for winner in [Side::Local, Side::Remote] {
            let merged = merge(Some(&base), Some(&local), Some(&remote), winner);
            assert_eq!(
                merged,
                Some(json(r#"{"title":"T2","body":"B2","tags":["a","b"]}"#))
            );
        }
    }

    #[test]
    fn three_way_merge_settles_same_field_edits_by_the_winner() {
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let base = json(r#"{"title":"T"}"#);
        let (local, remote) = (json(r#"{"title":"L"}"#), json(r#"{"title":"R"}"#));
        assert_eq!(
            merge(Some(&base), Some(&local), Some(&remote), Side::Local),
            Some(local.clone())
        );
        assert_eq!(
            merge(Some(&base), Some(&local), Some(&remote), Side::Remote),
            Some(remote)
        );
    }

    #[test]
    fn keep_both_ids_are_distinct_and_stable() {
        let (a, b) = keep_both_ids("s", "0f3c-aa", "0f3c-aa");
        assert_ne!(a, b);
        assert_eq!(keep_both_ids("s", "0f3c-aa", "0f3c-aa"), (a, b));
    }

    #[test]
    fn delta_round_trip() {
        let old = BTreeMap::from([("1".to_string(), story("a")), ("2".to_string(), story("b"))]);
        let new = BTreeMap::from([("2".to_string(), story("c")), ("3".to_string(), story("d"))]);
        let delta = generate_delta(&old, &new);
        let types: Vec<_> = delta.iter().map(|op| op.op_type).collect();
        assert_eq!(types, [OpType::Delete, OpType::Update, OpType::Create]);
        assert_eq!(apply_delta(&old, &delta), new);
    }

    #[test]
    fn metadata_update_replaces_metadata_on_a_copy() {
        let old = BTreeMap::from([("1".to_string(), story("a"))]);
        let mut op = Operation::new(OpType::MetadataUpdate, "1", Some(story("meta")));
        op.device_id = "d".into();
        let next = apply_delta(&old, &[op]);
        assert_eq!(next["1"].get("metadata"), Some(&story("meta")));
        assert!(old["1"].get("metadata").is_none());
    }

    #[test]
    fn operation_documents_match_the_json_form() {
        let mut op = Operation::new(OpType::Update, "s", Some(story("t")));
        op.device_id = "d".into();
        op.base_version = Some(4);
        op.metadata.insert("device_id".into(), Value::from("d"));
        op.extra.insert("hint".into(), Value::Bool(true));
        let via_serde: Value = serde_json::from_str(&serde_json::to_string(&op).unwrap()).unwrap();
        assert_eq!(op.to_value(), via_serde);
        assert_eq!(Operation::from_value(&op.to_value()), Ok(op));
        let err = Operation::from_value(
            &serde_json::from_str(r#"{"id":"x","type":"update","story_id":"s"}"#).unwrap(),
        );
        assert_eq!(err, Err("timestamp is missing".into()));
    }

    #[test]
    fn operation_wire_shape() {
        let text = r#"{"id":"x","type":"UPDATE","story_id":"s","data":{"t":1},"timestamp":12.0,"device_id":"d","hint":true}"#;
        let op: Operation = serde_json::from_str(text).unwrap();
        assert_eq!(op.op_type, OpType::Update);
        assert_eq!(op.timestamp, 12);
        assert_eq!(op.extra.get("hint"), Some(&Value::Bool(true)));
        let back = serde_json::to_string(&op).unwrap();
        assert_eq!(
            back,
            r#"{"id":"x","type":"update","story_id":"s","data":{"t":1},"timestamp":12,"device_id":"d","hint":true}"#
        );
    }
}
