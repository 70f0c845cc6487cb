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

use std::collections::{HashMap, HashSet};
use std::future::Future;

use serde_json::value::RawValue;
use sync_core::wire::{AcceptedOperation, ServerConflict};
use sync_core::{Map, OpType, Operation};
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
    pub json: String,
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
        })
    }
}

#[derive(Default)]
struct StoryInPush {
    /// Index in `rows` of this push's latest create/update/delete of the story.
    last_state_row: Option<usize>,
    last_metadata_row: Option<usize>,
    supersede: Option<Supersede>,
    rejected: bool,
}

/// Decides what a push stores, given the namespace's sequence number and what
/// the database already holds: `existing` maps the push's operation ids that
/// are already stored, `heads` maps its stories to their latest sequence number.
///
/// - An operation id already stored for the same story is acknowledged with
///   its original sequence number and not stored again (idempotent re-push);
///   for a different story it is a `duplicate_operation_id` conflict.
/// - An operation whose `base_version` is older than its story's head *before
///   this push* is a `concurrent_modification` conflict, and so is every later
///   operation on that story in the same push (they build on the rejected one).
///   Several operations on one story in one push may share a `base_version`.
/// - Operations without `base_version` (old clients) are always accepted.
pub fn plan_push(
    device_id: &str,
    ops: Vec<Operation>,
    start_version: u64,
    existing: &HashMap<String, ExistingOp>,
    heads: &HashMap<String, u64>,
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
        if story.rejected || stale {
            story.rejected = true;
            let server_version = current_head(&stories, &plan.rows);
            plan.conflicts.push(conflict(
                op.story_id,
                CONCURRENT_MODIFICATION,
                op.id,
                server_version,
            ));
            continue;
        }

        plan.version += 1;
        let seq = plan.version;
        op.version = Some(seq);
        if op.device_id.is_empty() {
            device_id.clone_into(&mut op.device_id);
        }
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
        )
        .unwrap();
        assert_eq!(
            plan.rows.iter().map(|r| r.live).collect::<Vec<_>>(),
            [false, true]
        );
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
