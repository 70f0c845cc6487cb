//! Patched updates at the storage level: each backend loads a patched
//! update's base and applies it inside the push transaction.

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

use crate::support::{Backend, Database, TestResult};

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
    let request = FetchRequest {
        since: 0,
        limit: None,
        exclude_device: Some("b"),
        tombstone_cutoff: 0,
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
