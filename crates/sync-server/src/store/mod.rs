//! Persistent storage: one [`Storage`] trait, a SQLite and a PostgreSQL implementation.
//!
//! Both keep the same data model:
//! - `api_keys`: one row per key; the row id is the key's *namespace*. Only a
//!   SHA-256 hash of each key is stored.
//! - `namespaces`: the namespace's sequence counter (the `version` clients track).
//!   A push locks this row for its whole transaction, which makes sequence
//!   assignment race-free even across server processes sharing one database.
//! - `operations`: every accepted operation under `(namespace, seq)`, unique by
//!   `(namespace, op_id)` so a re-sent operation is never stored twice.
//!
//! Operations are *live* while they are part of a story's current state: the
//! latest create/update/delete of the story, plus the latest metadata update
//! after it. Fetches return live operations only, so a client catching up (or a
//! new device starting from 0) gets each story's current state rather than its
//! whole history. A superseded operation keeps its id and sequence number (for
//! idempotency and conflict checks) but its content is dropped.
//!
//! A patched update is stored whole (`body`) and, beside it, in its *patched
//! form* (`patched_body`, made against `patch_base`): fetches of clients that
//! apply patches get that form when they already hold the base.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use serde::Deserialize;
use serde_json::value::RawValue;
use sync_core::engine::CONTENT_HASH;
use sync_core::patch::{self, PATCH};
use sync_core::wire::{AcceptedOperation, ServerConflict, PATCH_REJECTED};
use sync_core::{Map, OpType, Operation, Value};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::keys::KeyHash;

pub mod postgres;
pub mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::{SqliteDurability, SqliteStore};

/// A key's private space of stories; the key's row id.
pub type NamespaceId = i64;

/// Conflict type for a push whose `base_version` is older than the story's head.
pub const CONCURRENT_MODIFICATION: &str = "concurrent_modification";
/// Conflict type for an operation id already used by a different story's operation.
pub const DUPLICATE_OPERATION_ID: &str = "duplicate_operation_id";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("encoding an operation: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the OS random number generator failed: {0}")]
    Entropy(getrandom::Error),
    #[error("no active key matches {0:?}")]
    KeyNotFound(String),
    #[error("{0:?} names more than one active key; revoke by id instead")]
    AmbiguousKey(String),
    #[error("that key is already registered")]
    DuplicateKey,
}

/// A registered API key, without the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: NamespaceId,
    pub name: String,
    /// The first bytes of the key's hash, in hex: tells keys apart without revealing them.
    pub fingerprint: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// An operation as stored: its sequence number and JSON text (with `version` set).
#[derive(Debug, Clone)]
pub struct StoredOp {
    pub version: u64,
    pub json: Box<RawValue>,
}

/// What a push did.
#[derive(Debug, Default)]
pub struct PushOutcome {
    /// Every operation now on the server, new or already stored, with its sequence number.
    pub accepted: Vec<AcceptedOperation>,
    /// Operations not stored.
    pub conflicts: Vec<ServerConflict>,
    /// Operations this push stored, in sequence order (for `remote_change`).
    pub stored: Vec<StoredOp>,
    /// The namespace's sequence number after the push.
    pub version: u64,
    /// Patched updates stored as full updates.
    pub patches_applied: u64,
    /// Patched updates refused as `patch_rejected`.
    pub patches_rejected: u64,
}

/// Which page of operations a fetch asks for.
#[derive(Debug, Clone, Copy)]
pub struct FetchRequest<'a> {
    /// Return operations with a greater sequence number.
    pub since: u64,
    /// At most this many operations; `None` returns everything.
    pub limit: Option<usize>,
    /// Leave out operations pushed by this device.
    pub exclude_device: Option<&'a str>,
    /// With `since == 0` (a snapshot), leave out deletions received before this Unix time.
    pub tombstone_cutoff: i64,
    /// The client applies patched updates: serve an operation's patched form
    /// when its base is at or before `since` (the client holds that base).
    pub patches: bool,
}

/// One page of a fetch.
#[derive(Debug)]
pub struct FetchPage {
    pub operations: Vec<StoredOp>,
    /// The sequence number the client is now caught up to.
    pub version: u64,
    pub has_more: bool,
}

/// Another server process stored operations `from..=to` of namespace `ns`
/// (PostgreSQL only: several processes can share one database).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushNotice {
    pub server: String,
    pub ns: NamespaceId,
    pub from: u64,
    pub to: u64,
    pub device: String,
}

/// What the server needs from a database.
pub trait Storage: Send + Sync + 'static {
    /// The namespace of an active key with this hash.
    fn namespace_for_key(
        &self,
        hash: KeyHash,
    ) -> impl Future<Output = Result<Option<NamespaceId>, StoreError>> + Send;

    /// Stores a push in one transaction. `ops` are already validated.
    fn push(
        &self,
        ns: NamespaceId,
        device_id: String,
        ops: Vec<Operation>,
        received_at: i64,
    ) -> impl Future<Output = Result<PushOutcome, StoreError>> + Send;

    fn fetch(
        &self,
        ns: NamespaceId,
        request: FetchRequest<'_>,
    ) -> impl Future<Output = Result<FetchPage, StoreError>> + Send;

    /// The namespace's current sequence number.
    fn version(&self, ns: NamespaceId) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Live operations with sequence numbers in `from..=to` (for fanning out
    /// another process's push).
    fn operations_between(
        &self,
        ns: NamespaceId,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<StoredOp>, StoreError>> + Send;

    /// Fails when the database cannot be reached.
    fn check_health(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn add_key(
        &self,
        name: String,
        hash: KeyHash,
        created_at: i64,
    ) -> impl Future<Output = Result<KeyRecord, StoreError>> + Send;

    fn list_keys(&self) -> impl Future<Output = Result<Vec<KeyRecord>, StoreError>> + Send;

    /// Revokes the active key with this id (all digits) or name.
    fn revoke_key(
        &self,
        selector: String,
        revoked_at: i64,
    ) -> impl Future<Output = Result<KeyRecord, StoreError>> + Send;

    /// Pushes made by other server processes, for WebSocket fan-out. `None`
    /// when this backend cannot be shared between processes.
    fn remote_pushes(&self) -> Option<mpsc::Receiver<PushNotice>>;
}

/// An operation already on the server, found by id.
#[derive(Debug, Clone)]
pub struct ExistingOp {
    pub version: u64,
    pub story_id: String,
}

/// A row a push inserts.
#[derive(Debug)]
pub struct NewRow {
    pub seq: u64,
    pub op_id: String,
    pub story_id: String,
    pub op_type: OpType,
    pub live: bool,
    /// The whole operation, as fetched and fanned out.
    pub json: String,
    /// An accepted patched update's patched form.
    pub patched: Option<PatchedForm>,
}

/// A patched update as served to clients that apply patches: the stored
/// operation's members without `data`, with `patch` and `content_hash`.
#[derive(Debug)]
pub struct PatchedForm {
    /// The sequence number of the story content the patch applies to.
    pub base: u64,
    pub json: String,
}

impl NewRow {
    /// The `body` column: a row superseded within its own push keeps no content.
    pub fn body(&self) -> Option<&str> {
        self.live.then_some(self.json.as_str())
    }

    /// The `patched_body` column, kept (like `body`) only while the row is live.
    pub fn patched_body(&self) -> Option<&str> {
        self.live_patched_form().map(|form| form.json.as_str())
    }

    /// The `patch_base` column.
    pub fn patch_base(&self) -> Option<u64> {
        self.live_patched_form().map(|form| form.base)
    }

    fn live_patched_form(&self) -> Option<&PatchedForm> {
        self.patched.as_ref().filter(|_| self.live)
    }
}

/// Which of a story's existing live operations a push supersedes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Supersede {
    /// Only the latest metadata update (the push brought a newer one).
    Metadata,
    /// Everything (the push brought a new create/update/delete).
    All,
}

/// The writes a push makes, decided before anything is written.
#[derive(Debug, Default)]
pub struct PushPlan {
    pub rows: Vec<NewRow>,
    pub supersede: Vec<(String, Supersede)>,
    pub accepted: Vec<AcceptedOperation>,
    pub conflicts: Vec<ServerConflict>,
    /// The namespace's sequence number once the rows are in.
    pub version: u64,
    pub patches_applied: u64,
    pub patches_rejected: u64,
}

impl PushPlan {
    /// The outcome once the plan is committed.
    pub fn into_outcome(self) -> Result<PushOutcome, StoreError> {
        let stored = self
            .rows
            .into_iter()
            .map(|row| {
                Ok(StoredOp {
                    version: row.seq,
                    json: RawValue::from_string(row.json)?,
                })
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()?;
        Ok(PushOutcome {
            accepted: self.accepted,
            conflicts: self.conflicts,
            stored,
            version: self.version,
            patches_applied: self.patches_applied,
            patches_rejected: self.patches_rejected,
        })
    }
}

#[derive(Default)]
struct StoryInPush {
    /// Index in `rows` of this push's latest create/update/delete of the story.
    last_state_row: Option<usize>,
    last_metadata_row: Option<usize>,
    supersede: Option<Supersede>,
    /// The conflict type that stopped the story: every later operation on it
    /// in this push is refused the same way (they build on the refused one).
    rejected: Option<&'static str>,
}

impl StoryInPush {
    fn has_rows(&self) -> bool {
        self.last_state_row.is_some() || self.last_metadata_row.is_some()
    }
}

/// Decides what a push stores, given the namespace's sequence number and what
/// the database already holds: `existing` maps the push's operation ids that
/// are already stored, `heads` maps its stories to their latest sequence number,
/// and `patch_bases` maps each story with a patched operation to its live
/// create/update row, if it has one.
///
/// - An operation id already stored for the same story is acknowledged with
///   its original sequence number and not stored again (idempotent re-push);
///   for a different story it is a `duplicate_operation_id` conflict.
/// - An operation whose `base_version` is older than its story's head *before
///   this push* is a `concurrent_modification` conflict, and so is every later
///   operation on that story in the same push (they build on the rejected one).
///   Several operations on one story in one push may share a `base_version`.
/// - A patched update that passes those checks is stored as the full update it
///   stands for, and kept in its patched form too, or refused as
///   `patch_rejected` (see [`patched_story`]), and so is every later operation
///   on its story in the same push.
/// - Operations without `base_version` (old clients) are always accepted.
pub fn plan_push(
    device_id: &str,
    ops: Vec<Operation>,
    start_version: u64,
    existing: &HashMap<String, ExistingOp>,
    heads: &HashMap<String, u64>,
    patch_bases: &HashMap<String, StoredOp>,
) -> Result<PushPlan, serde_json::Error> {
    let mut plan = PushPlan {
        version: start_version,
        ..PushPlan::default()
    };
    let mut in_push: HashMap<String, ExistingOp> = HashMap::new();
    let mut stories: HashMap<String, StoryInPush> = HashMap::new();
    let mut story_order: Vec<String> = Vec::new();
    let mut seen_ids: HashSet<String> = HashSet::new();

    for mut op in ops {
        let head_before = heads.get(&op.story_id).copied().unwrap_or(0);
        let current_head = |stories: &HashMap<String, StoryInPush>, rows: &[NewRow]| {
            stories
                .get(&op.story_id)
                .and_then(|s| s.last_state_row.max(s.last_metadata_row))
                .map_or(head_before, |i| rows[i].seq)
        };

        if let Some(prior) = in_push.get(&op.id).or_else(|| existing.get(&op.id)) {
            if prior.story_id == op.story_id {
                plan.accepted.push(AcceptedOperation {
                    op_id: op.id,
                    version: prior.version,
                });
            } else {
                let server_version = current_head(&stories, &plan.rows);
                plan.conflicts.push(conflict(
                    op.story_id,
                    DUPLICATE_OPERATION_ID,
                    op.id,
                    server_version,
                ));
            }
            continue;
        }
        if !seen_ids.insert(op.id.clone()) {
            // Same id twice in one push, the first one rejected: reject this one too.
            let server_version = current_head(&stories, &plan.rows);
            plan.conflicts.push(conflict(
                op.story_id,
                DUPLICATE_OPERATION_ID,
                op.id,
                server_version,
            ));
            continue;
        }

        let story = stories.entry(op.story_id.clone()).or_insert_with(|| {
            story_order.push(op.story_id.clone());
            StoryInPush::default()
        });
        let stale = op.base_version.is_some_and(|base| head_before > base);
        let mut rejection = story.rejected.or(stale.then_some(CONCURRENT_MODIFICATION));
        let mut patched_content = None;
        if rejection.is_none() && patch::is_patched(&op) {
            let base = patch_bases.get(&op.story_id);
            match patched_story(&op, head_before, !story.has_rows(), base)? {
                Some(content) => {
                    patched_content = Some(content);
                    plan.patches_applied += 1;
                }
                None => {
                    plan.patches_rejected += 1;
                    rejection = Some(PATCH_REJECTED);
                }
            }
        }
        if let Some(kind) = rejection {
            story.rejected = Some(kind);
            let server_version = current_head(&stories, &plan.rows);
            plan.conflicts
                .push(conflict(op.story_id, kind, op.id, server_version));
            continue;
        }

        plan.version += 1;
        let seq = plan.version;
        op.version = Some(seq);
        if op.device_id.is_empty() {
            device_id.clone_into(&mut op.device_id);
        }
        let patched = match patched_content {
            Some(content) => {
                // As received plus the server's stamps, the operation is its
                // patched form; it is stored, fetched and fanned out whole.
                let form = PatchedForm {
                    // patched_story accepts a patch only on the story's head.
                    base: head_before,
                    json: serde_json::to_string(&op)?,
                };
                op.data = Some(content);
                patch::detach(&mut op);
                Some(form)
            }
            None => None,
        };
        let index = plan.rows.len();
        if op.op_type == OpType::MetadataUpdate {
            if let Some(previous) = story.last_metadata_row.replace(index) {
                plan.rows[previous].live = false;
            }
            story.supersede = story.supersede.max(Some(Supersede::Metadata));
        } else {
            for previous in [
                story.last_state_row.replace(index),
                story.last_metadata_row.take(),
            ]
            .into_iter()
            .flatten()
            {
                plan.rows[previous].live = false;
            }
            story.supersede = Some(Supersede::All);
        }
        plan.accepted.push(AcceptedOperation {
            op_id: op.id.clone(),
            version: seq,
        });
        in_push.insert(
            op.id.clone(),
            ExistingOp {
                version: seq,
                story_id: op.story_id.clone(),
            },
        );
        plan.rows.push(NewRow {
            seq,
            json: serde_json::to_string(&op)?,
            op_id: op.id,
            story_id: op.story_id,
            op_type: op.op_type,
            live: true,
            patched,
        });
    }

    // Only stories with operations from before this push have stored rows to
    // supersede; within the push, `live` flags are already settled above.
    plan.supersede = story_order
        .into_iter()
        .filter(|id| heads.get(id).is_some_and(|head| *head > 0))
        .filter_map(|id| {
            let supersede = stories.get(&id)?.supersede?;
            Some((id, supersede))
        })
        .collect();
    Ok(plan)
}

/// The part of a stored operation a patch applies to.
#[derive(Deserialize)]
struct StoredContent {
    data: Option<Value>,
}

/// The whole story a patched update stands for, or `None` when its patch is
/// rejected. The patch is accepted only when it was made on the story's head
/// (`base_version == head`), that head is the story's live create/update with
/// content (`base`), no earlier operation of this push changed the story
/// (`first_in_push`), it applies, and the result hashes to the operation's
/// `content_hash`.
fn patched_story(
    op: &Operation,
    head: u64,
    first_in_push: bool,
    base: Option<&StoredOp>,
) -> Result<Option<Value>, serde_json::Error> {
    let Some(base) =
        base.filter(|base| first_in_push && base.version == head && op.base_version == Some(head))
    else {
        return Ok(None);
    };
    let Some(base) = serde_json::from_str::<StoredContent>(base.json.get())?.data else {
        return Ok(None);
    };
    let (Some(patch), Some(Value::Str(expected_hash))) =
        (op.extra.get(PATCH), op.extra.get(CONTENT_HASH))
    else {
        return Ok(None);
    };
    Ok(patch::apply_checked(&base, patch, expected_hash))
}

fn conflict(story_id: String, kind: &str, op_id: String, server_version: u64) -> ServerConflict {
    ServerConflict {
        id: story_id,
        conflict_type: kind.to_owned(),
        op_id: Some(op_id),
        server_version: Some(server_version),
        extra: Map::new(),
    }
}

/// First bytes of a key hash in hex, shown by `keys list`.
pub fn fingerprint(hash: &[u8]) -> String {
    hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Picks the one active key a `keys revoke` selector names.
pub fn select_key(keys: &[KeyRecord], selector: &str) -> Result<NamespaceId, StoreError> {
    let active = keys.iter().filter(|k| k.revoked_at.is_none());
    let matches: Vec<&KeyRecord> =
        if !selector.is_empty() && selector.bytes().all(|b| b.is_ascii_digit()) {
            active.filter(|k| k.id.to_string() == selector).collect()
        } else {
            active.filter(|k| k.name == selector).collect()
        };
    match matches.as_slice() {
        [one] => Ok(one.id),
        [] => Err(StoreError::KeyNotFound(selector.to_owned())),
        _ => Err(StoreError::AmbiguousKey(selector.to_owned())),
    }
}

/// `u64` sequence numbers are stored as SQL `BIGINT`.
pub(crate) fn to_sql_seq(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_sql_seq(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative sequence number {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::engine::content_hash;
    use sync_core::Value;

    fn op(id: &str, story: &str, op_type: OpType, base: Option<u64>) -> Operation {
        let mut op = Operation::new(op_type, story, Some(Value::from("x")));
        op.id = id.into();
        op.base_version = base;
        op
    }

    fn existing(entries: &[(&str, u64, &str)]) -> HashMap<String, ExistingOp> {
        entries
            .iter()
            .map(|(id, version, story)| {
                (
                    id.to_string(),
                    ExistingOp {
                        version: *version,
                        story_id: story.to_string(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn assigns_consecutive_versions_and_stamps_the_device() {
        let plan = plan_push(
            "dev",
            vec![
                op("a", "s1", OpType::Create, None),
                op("b", "s2", OpType::Create, None),
            ],
            7,
            &HashMap::new(),
            &HashMap::new(),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(plan.version, 9);
        assert_eq!(plan.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [8, 9]);
        assert!(plan.rows[0].json.contains(r#""device_id":"dev""#));
        assert!(plan.rows[0].json.contains(r#""version":8"#));
    }

    #[test]
    fn stored_ids_are_acknowledged_not_stored_again() {
        let known = existing(&[("a", 3, "s1")]);
        let plan = plan_push(
            "dev",
            vec![
                op("a", "s1", OpType::Create, None),
                op("a", "s1", OpType::Create, None),
            ],
            5,
            &known,
            &HashMap::new(),
            &HashMap::new(),
        )
        .unwrap();
        assert!(plan.rows.is_empty());
        assert_eq!(plan.version, 5);
        assert_eq!(
            plan.accepted.iter().map(|a| a.version).collect::<Vec<_>>(),
            [3, 3]
        );
    }

    #[test]
    fn a_reused_id_on_another_story_is_a_conflict() {
        let known = existing(&[("a", 3, "s1")]);
        let plan = plan_push(
            "dev",
            vec![op("a", "s2", OpType::Create, None)],
            5,
            &known,
            &HashMap::new(),
            &HashMap::new(),
        )
        .unwrap();
        assert!(plan.rows.is_empty());
        assert_eq!(plan.conflicts[0].conflict_type, DUPLICATE_OPERATION_ID);
    }

    #[test]
    fn stale_base_version_is_a_conflict_for_the_rest_of_the_story() {
        let heads = HashMap::from([("s1".to_string(), 4)]);
        let plan = plan_push(
            "dev",
            vec![
                op("a", "s1", OpType::Update, Some(3)),
                op("b", "s1", OpType::Update, None),
                op("c", "s2", OpType::Update, Some(0)),
            ],
            4,
            &HashMap::new(),
            &heads,
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(plan.conflicts.len(), 2);
        assert_eq!(plan.conflicts[0].id, "s1");
        assert_eq!(plan.conflicts[0].server_version, Some(4));
        assert_eq!(plan.conflicts[0].op_id.as_deref(), Some("a"));
        assert_eq!(plan.rows.len(), 1);
        assert_eq!(plan.rows[0].op_id, "c");
    }

    #[test]
    fn several_edits_of_one_story_may_share_a_base() {
        let heads = HashMap::from([("s1".to_string(), 4)]);
        let plan = plan_push(
            "dev",
            vec![
                op("a", "s1", OpType::Update, Some(4)),
                op("b", "s1", OpType::Update, Some(4)),
            ],
            4,
            &HashMap::new(),
            &heads,
            &HashMap::new(),
        )
        .unwrap();
        assert!(plan.conflicts.is_empty());
        assert_eq!(
            plan.rows.iter().map(|r| r.live).collect::<Vec<_>>(),
            [false, true]
        );
    }

    #[test]
    fn liveness_keeps_latest_state_and_later_metadata() {
        let plan = plan_push(
            "dev",
            vec![
                op("a", "s", OpType::Create, None),
                op("b", "s", OpType::MetadataUpdate, None),
                op("c", "s", OpType::MetadataUpdate, None),
                op("d", "t", OpType::MetadataUpdate, None),
                op("e", "new", OpType::Create, None),
            ],
            9,
            &HashMap::new(),
            &HashMap::from([("s".to_string(), 8), ("t".to_string(), 9)]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            plan.rows.iter().map(|r| r.live).collect::<Vec<_>>(),
            [true, false, true, true, true]
        );
        assert_eq!(
            plan.supersede,
            vec![
                ("s".to_string(), Supersede::All),
                ("t".to_string(), Supersede::Metadata)
            ]
        );
        let plan = plan_push(
            "dev",
            vec![
                op("e", "s", OpType::MetadataUpdate, None),
                op("f", "s", OpType::Delete, None),
            ],
            4,
            &HashMap::new(),
            &HashMap::new(),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            plan.rows.iter().map(|r| r.live).collect::<Vec<_>>(),
            [false, true]
        );
    }

    fn story(text: &str) -> Value {
        serde_json::from_value(serde_json::json!({
            "title": "Epic",
            "passages": [{"name": "Start", "text": text}, {"name": "End", "text": "The end."}],
        }))
        .unwrap()
    }

    /// The live row a story's create/update left at `version`.
    fn stored(version: u64, id: &str, story_id: &str, content: &Value) -> StoredOp {
        let mut op = Operation::new(OpType::Update, story_id, Some(content.clone()));
        op.id = id.into();
        op.version = Some(version);
        StoredOp {
            version,
            json: RawValue::from_string(serde_json::to_string(&op).unwrap()).unwrap(),
        }
    }

    fn patched(id: &str, story_id: &str, base: u64, from: &Value, to: &Value) -> Operation {
        let mut op = Operation::new(OpType::Update, story_id, None);
        op.id = id.into();
        op.base_version = Some(base);
        op.extra
            .insert(PATCH.into(), Value::Array(patch::diff(from, to)));
        op.extra
            .insert(CONTENT_HASH.into(), Value::Str(content_hash(Some(to))));
        op
    }

    fn stored_operation(row: &NewRow) -> Operation {
        serde_json::from_str(&row.json).unwrap()
    }

    /// Plans a push where story `s` was last written (holding `story("old")`)
    /// at version `written`, and its head, the namespace's latest, is `head`.
    fn plan_on_s(ops: Vec<Operation>, written: u64, head: u64) -> PushPlan {
        plan_push(
            "dev",
            ops,
            head,
            &existing(&[("stored-patch", 4, "s")]),
            &HashMap::from([("s".to_string(), head)]),
            &HashMap::from([("s".to_string(), stored(written, "w", "s", &story("old")))]),
        )
        .unwrap()
    }

    #[test]
    fn an_accepted_patch_is_stored_as_a_full_update() {
        let plan = plan_on_s(
            vec![patched("p", "s", 5, &story("old"), &story("new"))],
            5,
            5,
        );
        assert!(plan.conflicts.is_empty());
        assert_eq!((plan.patches_applied, plan.patches_rejected), (1, 0));
        assert_eq!(plan.version, 6);
        let row = stored_operation(&plan.rows[0]);
        assert_eq!(row.data, Some(story("new")));
        assert_eq!(row.version, Some(6));
        assert!(!row.extra.contains_key(PATCH));
        assert!(!row.extra.contains_key(CONTENT_HASH));
        assert_eq!(plan.supersede, vec![("s".to_string(), Supersede::All)]);
    }

    #[test]
    fn an_accepted_patch_keeps_its_patched_form() {
        let sent = patched("p", "s", 5, &story("old"), &story("new"));
        let plan = plan_on_s(vec![sent.clone()], 5, 5);
        let row = &plan.rows[0];
        assert_eq!(row.patch_base(), Some(5));
        let served: Operation = serde_json::from_str(row.patched_body().unwrap()).unwrap();
        let mut whole = stored_operation(row);
        assert_eq!(
            served,
            Operation {
                data: None,
                extra: sent.extra,
                ..whole.clone()
            }
        );
        whole.data = patch::apply(&story("old"), &served.extra[PATCH]).ok();
        assert_eq!(whole, stored_operation(row));
    }

    #[test]
    fn a_patched_update_superseded_in_its_push_keeps_no_patched_form() {
        let plan = plan_on_s(
            vec![
                patched("p", "s", 5, &story("old"), &story("new")),
                op("u", "s", OpType::Update, Some(5)),
            ],
            5,
            5,
        );
        assert!(plan.conflicts.is_empty());
        let superseded = &plan.rows[0];
        assert!(superseded.patched.is_some() && !superseded.live);
        assert_eq!(
            (
                superseded.body(),
                superseded.patched_body(),
                superseded.patch_base()
            ),
            (None, None, None)
        );
    }

    #[test]
    fn a_patch_with_the_wrong_hash_is_rejected_without_a_sequence_number() {
        let mut wrong = patched("p", "s", 5, &story("old"), &story("new"));
        wrong.extra.insert(
            CONTENT_HASH.into(),
            content_hash(Some(&story("other"))).into(),
        );
        let plan = plan_on_s(vec![wrong, op("t1", "t", OpType::Create, None)], 5, 5);
        assert_eq!((plan.patches_applied, plan.patches_rejected), (0, 1));
        let rejected = &plan.conflicts[0];
        assert_eq!(
            (rejected.id.as_str(), rejected.conflict_type.as_str()),
            ("s", PATCH_REJECTED)
        );
        assert_eq!(rejected.op_id.as_deref(), Some("p"));
        assert_eq!(rejected.server_version, Some(5));
        assert_eq!(plan.rows.len(), 1);
        assert_eq!((plan.rows[0].op_id.as_str(), plan.rows[0].seq), ("t1", 6));
    }

    #[test]
    fn a_patch_on_a_head_that_is_not_its_base_content_is_rejected() {
        // The head (6) is a metadata update after the content written at 5.
        let plan = plan_on_s(
            vec![patched("p", "s", 6, &story("old"), &story("new"))],
            5,
            6,
        );
        assert_eq!(plan.conflicts[0].conflict_type, PATCH_REJECTED);
        assert_eq!(plan.conflicts[0].server_version, Some(6));
        assert!(plan.rows.is_empty());
        // The head is a delete: the story has no live content at all.
        let plan = plan_push(
            "dev",
            vec![patched("p", "s", 6, &story("old"), &story("new"))],
            6,
            &HashMap::new(),
            &HashMap::from([("s".to_string(), 6)]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(plan.conflicts[0].conflict_type, PATCH_REJECTED);
        assert!(plan.rows.is_empty());
    }

    #[test]
    fn a_stale_patch_is_a_concurrent_modification() {
        let plan = plan_on_s(
            vec![patched("p", "s", 4, &story("old"), &story("new"))],
            5,
            5,
        );
        assert_eq!(plan.conflicts[0].conflict_type, CONCURRENT_MODIFICATION);
        assert_eq!((plan.patches_applied, plan.patches_rejected), (0, 0));
        assert!(plan.rows.is_empty());
    }

    #[test]
    fn a_patch_after_another_operation_on_its_story_is_rejected_with_the_rest_of_the_story() {
        let plan = plan_on_s(
            vec![
                op("m", "s", OpType::MetadataUpdate, Some(5)),
                patched("p", "s", 5, &story("old"), &story("new")),
                op("u", "s", OpType::Update, Some(5)),
            ],
            5,
            5,
        );
        assert_eq!(plan.rows.len(), 1);
        assert_eq!(plan.rows[0].op_id, "m");
        let rejected: Vec<_> = plan
            .conflicts
            .iter()
            .map(|c| {
                (
                    c.op_id.as_deref(),
                    c.conflict_type.as_str(),
                    c.server_version,
                )
            })
            .collect();
        assert_eq!(
            rejected,
            [
                (Some("p"), PATCH_REJECTED, Some(6)),
                (Some("u"), PATCH_REJECTED, Some(6))
            ]
        );
    }

    #[test]
    fn a_patch_that_does_not_apply_is_rejected() {
        let mut inapplicable = patched("p", "s", 5, &story("old"), &story("new"));
        let patch: Value = serde_json::from_value(serde_json::json!(
            [{"op": "replace", "path": "/passages/7/text", "value": "x"}]
        ))
        .unwrap();
        inapplicable.extra.insert(PATCH.into(), patch);
        let plan = plan_on_s(vec![inapplicable], 5, 5);
        assert_eq!(plan.conflicts[0].conflict_type, PATCH_REJECTED);
        assert!(plan.rows.is_empty());
    }

    #[test]
    fn a_re_sent_patched_operation_is_acknowledged_with_its_original_version() {
        // Stored at 4 as a full update; the story has moved on since.
        let plan = plan_on_s(
            vec![patched(
                "stored-patch",
                "s",
                3,
                &story("old"),
                &story("new"),
            )],
            5,
            5,
        );
        assert!(plan.conflicts.is_empty() && plan.rows.is_empty());
        assert_eq!(plan.accepted[0].version, 4);
        assert_eq!((plan.patches_applied, plan.patches_rejected), (0, 0));
    }

    #[test]
    fn revoke_selector_by_id_or_unique_name() {
        let key = |id, name: &str, revoked: Option<i64>| KeyRecord {
            id,
            name: name.into(),
            fingerprint: String::new(),
            created_at: 0,
            revoked_at: revoked,
        };
        let keys = [
            key(1, "a", None),
            key(2, "b", None),
            key(3, "b", None),
            key(4, "c", Some(1)),
        ];
        assert_eq!(select_key(&keys, "1").unwrap(), 1);
        assert_eq!(select_key(&keys, "a").unwrap(), 1);
        assert!(matches!(
            select_key(&keys, "b"),
            Err(StoreError::AmbiguousKey(_))
        ));
        assert!(matches!(
            select_key(&keys, "c"),
            Err(StoreError::KeyNotFound(_))
        ));
    }
}
