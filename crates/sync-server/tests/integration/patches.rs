//! Patched updates at the storage level: each backend loads a patched
//! update's base and applies it inside the push transaction, and keeps its
//! patched form for fetches of clients that hold the base.

use serde_json::json;
use sync_core::engine::{content_hash, CONTENT_HASH};
use sync_core::patch::{self, PATCH};
use sync_core::wire::PATCH_REJECTED;
use sync_core::{OpType, Operation, Value};
use sync_server::keys;
use sync_server::store::{
    FetchRequest, NamespaceId, PostgresStore, PushOutcome, SqliteDurability, SqliteStore, Storage,
    CONCURRENT_MODIFICATION,
};

use crate::support::{fail, Backend, Database, TestResult};

pub async fn stores_apply_patches_in_the_push_transaction(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    match db.postgres_url() {
        None => {
            let path = db.dir().join("sync.db");
            exercise(SqliteStore::open(&path, SqliteDurability::Normal)?).await
        }
        Some(url) => exercise(PostgresStore::connect(url, 2).await?).await,
    }
}

pub async fn stores_serve_patched_forms_to_clients_holding_the_base(
    backend: Backend,
) -> TestResult {
    let db = Database::new(backend).await?;
    match db.postgres_url() {
        None => {
            let path = db.dir().join("sync.db");
            serve_patched_forms(SqliteStore::open(&path, SqliteDurability::Normal)?).await
        }
        Some(url) => serve_patched_forms(PostgresStore::connect(url, 2).await?).await,
    }
}

fn story(text: &str) -> Value {
    serde_json::from_value(json!({
        "title": "Epic",
        "passages": [{"name": "Start", "text": text}, {"name": "End", "text": "The end."}],
    }))
    .expect("plain JSON")
}

fn operation(id: &str, op_type: OpType, data: Option<Value>, base: Option<u64>) -> Operation {
    let mut op = Operation::new(op_type, "epic", data);
    op.id = id.into();
    op.base_version = base;
    op
}

fn patched(id: &str, base: u64, from: &Value, to: &Value) -> Operation {
    let mut op = operation(id, OpType::Update, None, Some(base));
    op.extra
        .insert(PATCH.into(), Value::Array(patch::diff(from, to)));
    op.extra
        .insert(CONTENT_HASH.into(), content_hash(Some(to)).into());
    op
}

/// `(op_id, conflict type, server_version)` of each conflict.
fn conflicts(outcome: &PushOutcome) -> Vec<(String, String, Option<u64>)> {
    outcome
        .conflicts
        .iter()
        .map(|c| {
            (
                c.op_id.clone().unwrap_or_default(),
                c.conflict_type.clone(),
                c.server_version,
            )
        })
        .collect()
}

/// What another device fetches from scratch.
async fn snapshot<S: Storage>(store: &S, ns: NamespaceId) -> Vec<Operation> {
    fetch(store, ns, 0, false).await
}

/// What another device fetches after `since`, asking for patched forms or not.
async fn fetch<S: Storage>(
    store: &S,
    ns: NamespaceId,
    since: u64,
    patches: bool,
) -> Vec<Operation> {
    let request = FetchRequest {
        since,
        limit: None,
        exclude_device: Some("b"),
        tombstone_cutoff: 0,
        patches,
    };
    let page = store.fetch(ns, request).await.expect("fetch");
    page.operations
        .iter()
        .map(|op| serde_json::from_str(op.json.get()).expect("stored operation"))
        .collect()
}

async fn exercise<S: Storage>(store: S) -> TestResult {
    let ns = store
        .add_key("main".into(), keys::hash("patch-key-0123456789"), 0)
        .await?
        .id;
    let push = |ops: Vec<Operation>| store.push(ns, "a".into(), ops, 1_700_000_000);
    let (v1, v2) = (story("Once."), story("Once, rewritten."));

    push(vec![operation(
        "full",
        OpType::Create,
        Some(v1.clone()),
        None,
    )])
    .await?;
    let applied = push(vec![patched("p1", 1, &v1, &v2)]).await?;
    assert_eq!(conflicts(&applied), []);
    assert_eq!(
        (applied.version, applied.patches_applied),
        (2, 1),
        "accepted at the head"
    );
    let stored: Operation = serde_json::from_str(applied.stored[0].json.get())?;
    assert_eq!(stored.data.as_ref(), Some(&v2));
    assert!(!stored.extra.contains_key(PATCH) && !stored.extra.contains_key(CONTENT_HASH));
    let fetched = snapshot(&store, ns).await;
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0], stored);

    let mut wrong_hash = patched("p2", 2, &v2, &story("Twice."));
    wrong_hash
        .extra
        .insert(CONTENT_HASH.into(), content_hash(Some(&v1)).into());
    let refused = push(vec![
        wrong_hash,
        patched("p3", 1, &v1, &story("Stale.")),
        patched("p1", 1, &v1, &v2),
    ])
    .await?;
    assert_eq!(
        conflicts(&refused),
        [
            ("p2".into(), PATCH_REJECTED.into(), Some(2)),
            ("p3".into(), PATCH_REJECTED.into(), Some(2)),
        ],
        "once a patch is refused, the rest of its story is refused the same way"
    );
    assert_eq!(refused.accepted[0].op_id, "p1");
    assert_eq!(
        refused.accepted[0].version, 2,
        "a re-sent patch keeps its version"
    );
    assert_eq!((refused.version, refused.stored.len()), (2, 0));
    let stale = push(vec![patched("p3", 1, &v1, &story("Stale."))]).await?;
    assert_eq!(
        conflicts(&stale),
        [("p3".into(), CONCURRENT_MODIFICATION.into(), Some(2))]
    );
    assert_eq!(snapshot(&store, ns).await[0].data.as_ref(), Some(&v2));

    // The head is a metadata update, then a delete: no content to patch at the head.
    let metadata = Value::Object([("tag".to_owned(), "draft".into())].into_iter().collect());
    push(vec![operation(
        "m",
        OpType::MetadataUpdate,
        Some(metadata),
        Some(2),
    )])
    .await?;
    let after_metadata = push(vec![patched("p4", 3, &v2, &story("Four."))]).await?;
    assert_eq!(
        conflicts(&after_metadata),
        [("p4".into(), PATCH_REJECTED.into(), Some(3))]
    );
    push(vec![operation("d", OpType::Delete, None, Some(3))]).await?;
    let after_delete = push(vec![patched("p5", 4, &v2, &story("Five."))]).await?;
    assert_eq!(
        conflicts(&after_delete),
        [("p5".into(), PATCH_REJECTED.into(), Some(4))]
    );
    assert_eq!(after_delete.version, 4);
    Ok(())
}

async fn serve_patched_forms<S: Storage>(store: S) -> TestResult {
    let ns = store
        .add_key("main".into(), keys::hash("patch-key-0123456789"), 0)
        .await?
        .id;
    let push = |ops: Vec<Operation>| store.push(ns, "a".into(), ops, 1_700_000_000);
    let (v1, v2) = (story("Once."), story("Once, rewritten."));
    let mut other = operation("other", OpType::Create, Some(story("Elsewhere.")), None);
    other.story_id = "other".into();
    push(vec![other]).await?;
    push(vec![operation(
        "full",
        OpType::Create,
        Some(v1.clone()),
        None,
    )])
    .await?;
    let sent = patched("p1", 2, &v1, &v2);
    let applied = push(vec![sent.clone()]).await?;
    assert_eq!((applied.version, applied.patches_applied), (3, 1));
    let whole: Operation = serde_json::from_str(applied.stored[0].json.get())?;

    let served = fetch(&store, ns, 2, true).await;
    assert_eq!(
        served,
        [Operation {
            data: None,
            extra: sent.extra.clone(),
            ..whole.clone()
        }],
        "a client that has seen the base gets the patched form"
    );
    let patch = served[0].extra.get(PATCH).ok_or_else(|| fail("no patch"))?;
    let rebuilt = patch::apply(&v1, patch).map_err(|e| fail(format!("{e:?}")))?;
    assert_eq!(rebuilt, v2);
    assert_eq!(
        served[0].extra.get(CONTENT_HASH),
        Some(&content_hash(Some(&rebuilt)).into())
    );
    assert_eq!(
        fetch(&store, ns, 2, false).await,
        std::slice::from_ref(&whole),
        "without the flag"
    );
    assert_eq!(
        fetch(&store, ns, 1, true).await,
        std::slice::from_ref(&whole),
        "the base is after since"
    );
    let fresh = fetch(&store, ns, 0, true).await;
    assert_eq!(fresh.len(), 2);
    assert_eq!(fresh[1], whole, "a snapshot is whole");

    let replaced = push(vec![operation(
        "full-2",
        OpType::Update,
        Some(story("Replaced.")),
        Some(3),
    )])
    .await?;
    let replacement: Operation = serde_json::from_str(replaced.stored[0].json.get())?;
    assert_eq!(
        fetch(&store, ns, 2, true).await,
        std::slice::from_ref(&replacement),
        "a superseded patched update is served in neither form"
    );
    assert_eq!(fetch(&store, ns, 2, false).await, [replacement]);
    Ok(())
}

/// The schema before patched forms were kept: version 1 of the SQLite file.
const SQLITE_SCHEMA_V1: &str = "
CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE namespaces (ns INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE operations (
    ns INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    op_id TEXT NOT NULL,
    story_id TEXT NOT NULL,
    op_type TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    live INTEGER NOT NULL,
    body TEXT,
    PRIMARY KEY (ns, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX operations_by_id ON operations (ns, op_id);
CREATE INDEX operations_by_story ON operations (ns, story_id, seq);
CREATE INDEX operations_live ON operations (ns, seq) WHERE live = 1;
PRAGMA user_version = 1;
";

/// The PostgreSQL schema before patched forms were kept.
const POSTGRES_SCHEMA_V1: &str = "
CREATE TABLE api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE namespaces (ns BIGINT PRIMARY KEY, seq BIGINT NOT NULL);
CREATE TABLE operations (
    ns BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    op_id TEXT NOT NULL,
    story_id TEXT NOT NULL,
    op_type TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    live BOOLEAN NOT NULL,
    body TEXT,
    PRIMARY KEY (ns, seq)
);
CREATE UNIQUE INDEX operations_by_id ON operations (ns, op_id);
CREATE INDEX operations_by_story ON operations (ns, story_id, seq);
CREATE INDEX operations_live ON operations (ns, seq) WHERE live;
";

const OLD_KEY: &str = "patch-key-0123456789";

/// A database made before patched forms were kept, holding a key and the
/// `epic` story's create, opens, keeps both, and stores patched forms.
pub async fn databases_from_before_patched_forms_are_migrated(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let mut created = operation("full", OpType::Create, Some(story("Once.")), None);
    created.device_id = "a".into();
    created.version = Some(1);
    let body = serde_json::to_string(&created)?;
    let hash = keys::hash(OLD_KEY);
    match db.postgres_url() {
        None => {
            let path = db.dir().join("sync.db");
            {
                let old = rusqlite::Connection::open(&path)?;
                old.execute_batch(SQLITE_SCHEMA_V1)?;
                old.execute(
                    "INSERT INTO api_keys (name, key_hash, created_at) VALUES ('main', ?1, 0)",
                    [hash.as_slice()],
                )?;
                let ns = old.last_insert_rowid();
                old.execute(
                    "INSERT INTO operations VALUES (?1, 1, 'full', 'epic', 'create', 'a', 0, 1, ?2)",
                    rusqlite::params![ns, body],
                )?;
                old.execute("INSERT INTO namespaces VALUES (?1, 1)", [ns])?;
            }
            let open = || SqliteStore::open(&path, SqliteDurability::Normal);
            let served = migrated(open()?, &created).await?;
            let version: i64 =
                rusqlite::Connection::open(&path)?
                    .query_row("PRAGMA user_version", [], |row| row.get(0))?;
            assert_eq!(version, 2);
            reopened(open()?, &served).await
        }
        Some(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(connection);
            client.batch_execute(POSTGRES_SCHEMA_V1).await?;
            let ns: i64 = client
                .query_one(
                    "INSERT INTO api_keys (name, key_hash, created_at) VALUES ('main', $1, 0)
                     RETURNING id",
                    &[&hash.as_slice()],
                )
                .await?
                .get(0);
            client
                .execute(
                    "INSERT INTO operations VALUES ($1, 1, 'full', 'epic', 'create', 'a', 0, true, $2)",
                    &[&ns, &body],
                )
                .await?;
            client
                .execute("INSERT INTO namespaces VALUES ($1, 1)", &[&ns])
                .await?;
            drop(client);
            let _ = driver.await;
            let served = migrated(PostgresStore::connect(url, 2).await?, &created).await?;
            reopened(PostgresStore::connect(url, 2).await?, &served).await
        }
    }
}

/// Checks a just-migrated store kept `created` and stores patched forms;
/// returns what a client holding `created` fetches after a patched update.
async fn migrated<S: Storage>(
    store: S,
    created: &Operation,
) -> Result<Vec<Operation>, Box<dyn std::error::Error + Send + Sync>> {
    let ns = store
        .namespace_for_key(keys::hash(OLD_KEY))
        .await?
        .ok_or_else(|| fail("the key survives the migration"))?;
    assert_eq!(snapshot(&store, ns).await, std::slice::from_ref(created));
    let v1 = created.data.clone().ok_or_else(|| fail("no story"))?;
    let applied = store
        .push(
            ns,
            "a".into(),
            vec![patched("p1", 1, &v1, &story("Once, rewritten."))],
            0,
        )
        .await?;
    assert_eq!((applied.version, applied.patches_applied), (2, 1));
    let served = fetch(&store, ns, 1, true).await;
    assert!(served[0].data.is_none() && served[0].extra.contains_key(PATCH));
    Ok(served)
}

/// Opening a migrated database again changes nothing.
async fn reopened<S: Storage>(store: S, served: &[Operation]) -> TestResult {
    let ns = store
        .namespace_for_key(keys::hash(OLD_KEY))
        .await?
        .ok_or_else(|| fail("the key is still there"))?;
    assert_eq!(fetch(&store, ns, 1, true).await, served);
    Ok(())
}
