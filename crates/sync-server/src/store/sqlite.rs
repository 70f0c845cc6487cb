//! SQLite storage: the embedded default.
//!
//! One writer connection (SQLite allows one writer at a time anyway) and a small
//! pool of reader connections, all used on tokio's blocking pool. WAL mode lets
//! readers run while a push commits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::value::RawValue;
use sync_core::patch;
use sync_core::Operation;
use tokio::sync::mpsc;

use super::{
    fingerprint, from_sql_seq, plan_push, select_key, to_sql_seq, ExistingOp, FetchPage,
    FetchRequest, KeyRecord, NamespaceId, PushNotice, PushOutcome, Storage, StoreError, StoredOp,
    Supersede,
};
use crate::keys::{hashes_match, KeyHash};

/// Reader connections kept open between requests.
const IDLE_READERS: usize = 8;
/// How long a statement waits for a lock held by another process (e.g. `keys add`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema of a new database; [`migrate`] brings older ones up to it.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS namespaces (
    ns INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    ns INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    op_id TEXT NOT NULL,
    story_id TEXT NOT NULL,
    op_type TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    live INTEGER NOT NULL,
    body TEXT,
    patched_body TEXT,
    patch_base INTEGER,
    PRIMARY KEY (ns, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS operations_by_id ON operations (ns, op_id);
CREATE INDEX IF NOT EXISTS operations_by_story ON operations (ns, story_id, seq);
CREATE INDEX IF NOT EXISTS operations_live ON operations (ns, seq) WHERE live = 1;
";

/// `PRAGMA user_version` of a database with [`SCHEMA`]. Version 1 had no
/// patched forms (`patched_body`, `patch_base`).
const SCHEMA_VERSION: i64 = 2;

/// How hard SQLite works to make a commit survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteDurability {
    /// fsync on every commit: an acknowledged push survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash, may lose the last
    /// commits on power loss. Faster.
    Normal,
}

#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<ReaderPool>,
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic mid-transaction rolls the transaction back when it unwinds, so
    // the connection itself is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path, durability: SqliteDurability) -> Result<Self, StoreError> {
        let mut writer = Connection::open(path)?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        let synchronous = match durability {
            SqliteDurability::Full => "FULL",
            SqliteDurability::Normal => "NORMAL",
        };
        writer.pragma_update(None, "synchronous", synchronous)?;
        migrate(&mut writer)?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::new(ReaderPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || job(&mut lock(&writer))).await?
    }

    async fn read<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let mut conn = readers.take()?;
            let result = job(&mut conn);
            readers.give_back(conn);
            result
        })
        .await?
    }
}

/// Creates the schema in a new database, or upgrades an older one, in one
/// transaction (another process, e.g. `keys add`, may open the file at the same time).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    tx.execute_batch(SCHEMA)?;
    // A new database has just got the columns; an older one's table was kept.
    let has_patched_forms: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('operations') WHERE name = 'patched_body')",
        [],
        |row| row.get(0),
    )?;
    if !has_patched_forms {
        tx.execute_batch(
            "ALTER TABLE operations ADD COLUMN patched_body TEXT;
             ALTER TABLE operations ADD COLUMN patch_base INTEGER;",
        )?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = lock(&self.idle).pop() {
            return Ok(conn);
        }
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }
}

fn push_blocking(
    conn: &mut Connection,
    ns: NamespaceId,
    device_id: &str,
    ops: Vec<Operation>,
    received_at: i64,
) -> Result<PushOutcome, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let start: i64 = tx
        .query_row("SELECT seq FROM namespaces WHERE ns = ?1", [ns], |row| {
            row.get(0)
        })
        .optional()?
        .unwrap_or(0);

    let mut existing = HashMap::new();
    let mut heads = HashMap::new();
    let mut patch_bases = HashMap::new();
    {
        let mut by_id =
            tx.prepare_cached("SELECT seq, story_id FROM operations WHERE ns = ?1 AND op_id = ?2")?;
        let mut head =
            tx.prepare_cached("SELECT MAX(seq) FROM operations WHERE ns = ?1 AND story_id = ?2")?;
        let mut live_content = tx.prepare_cached(
            "SELECT seq, body FROM operations INDEXED BY operations_by_story
             WHERE ns = ?1 AND story_id = ?2 AND live = 1 AND op_type IN ('create', 'update')",
        )?;
        for op in &ops {
            if !existing.contains_key(&op.id) {
                let found = by_id
                    .query_row(params![ns, op.id], |row| {
                        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                    })
                    .optional()?;
                if let Some((seq, story_id)) = found {
                    let version = from_sql_seq(seq)?;
                    existing.insert(op.id.clone(), ExistingOp { version, story_id });
                }
            }
            if !heads.contains_key(&op.story_id) {
                let seq: Option<i64> =
                    head.query_row(params![ns, op.story_id], |row| row.get(0))?;
                heads.insert(
                    op.story_id.clone(),
                    seq.map(from_sql_seq).transpose()?.unwrap_or(0),
                );
            }
            if patch::is_patched(op) && !patch_bases.contains_key(&op.story_id) {
                let found = live_content
                    .query_row(params![ns, op.story_id], |row| {
                        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                    })
                    .optional()?;
                if let Some((seq, body)) = found {
                    patch_bases.insert(op.story_id.clone(), stored_op(seq, body)?);
                }
            }
        }
    }

    let plan = plan_push(
        device_id,
        ops,
        from_sql_seq(start)?,
        &existing,
        &heads,
        &patch_bases,
    )?;
    if !plan.rows.is_empty() {
        let mut supersede_all = tx.prepare_cached(
            "UPDATE operations INDEXED BY operations_by_story
             SET live = 0, body = NULL, patched_body = NULL, patch_base = NULL
             WHERE ns = ?1 AND story_id = ?2 AND live = 1",
        )?;
        let mut supersede_metadata = tx.prepare_cached(
            "UPDATE operations INDEXED BY operations_by_story SET live = 0, body = NULL
             WHERE ns = ?1 AND story_id = ?2 AND live = 1 AND op_type = 'metadata_update'",
        )?;
        for (story_id, scope) in &plan.supersede {
            match scope {
                Supersede::All => supersede_all.execute(params![ns, story_id])?,
                Supersede::Metadata => supersede_metadata.execute(params![ns, story_id])?,
            };
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO operations
               (ns, seq, op_id, story_id, op_type, device_id, received_at, live, body,
                patched_body, patch_base)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for row in &plan.rows {
            insert.execute(params![
                ns,
                to_sql_seq(row.seq),
                row.op_id,
                row.story_id,
                row.op_type.as_str(),
                device_id,
                received_at,
                row.live,
                row.body(),
                row.patched_body(),
                row.patch_base().map(to_sql_seq),
            ])?;
        }
        tx.execute(
            "INSERT INTO namespaces (ns, seq) VALUES (?1, ?2) ON CONFLICT (ns) DO UPDATE SET seq = excluded.seq",
            params![ns, to_sql_seq(plan.version)],
        )?;
    }
    tx.commit()?;
    plan.into_outcome()
}

fn fetch_blocking(
    conn: &mut Connection,
    ns: NamespaceId,
    request: OwnedFetch,
) -> Result<FetchPage, StoreError> {
    // One read transaction: the version and the operations come from the same snapshot.
    let tx = conn.transaction()?;
    let head: i64 = tx
        .query_row("SELECT seq FROM namespaces WHERE ns = ?1", [ns], |row| {
            row.get(0)
        })
        .optional()?
        .unwrap_or(0);
    // A row's patched form (when it has one: `patch_base` is NULL otherwise)
    // goes to a client that applies patches and holds the base.
    let mut query = tx.prepare_cached(
        "SELECT seq, CASE WHEN ?7 AND patch_base <= ?2 THEN patched_body ELSE body END
         FROM operations INDEXED BY operations_live
         WHERE ns = ?1 AND live = 1 AND seq > ?2 AND device_id <> ?3
           AND NOT (?4 AND op_type = 'delete' AND received_at < ?5)
         ORDER BY seq LIMIT ?6",
    )?;
    let fetch_limit = request.limit.map_or(-1, |l| {
        i64::try_from(l.saturating_add(1)).unwrap_or(i64::MAX)
    });
    let rows = query.query_map(
        params![
            ns,
            to_sql_seq(request.since),
            request.exclude_device,
            request.since == 0,
            request.tombstone_cutoff,
            fetch_limit,
            request.patches,
        ],
        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
    )?;
    let mut operations = Vec::new();
    for row in rows {
        let (seq, body) = row?;
        operations.push(stored_op(seq, body)?);
    }
    drop(query);
    tx.commit()?;
    Ok(finish_page(operations, request.limit, from_sql_seq(head)?))
}

/// Trims a page fetched with one extra row and works out where the client is.
pub(super) fn finish_page(
    mut operations: Vec<StoredOp>,
    limit: Option<usize>,
    head: u64,
) -> FetchPage {
    match limit {
        Some(limit) if operations.len() > limit => {
            operations.truncate(limit);
            let version = operations.last().map_or(head, |op| op.version);
            FetchPage {
                operations,
                version,
                has_more: true,
            }
        }
        _ => FetchPage {
            operations,
            version: head,
            has_more: false,
        },
    }
}

pub(super) fn stored_op(seq: i64, body: String) -> Result<StoredOp, StoreError> {
    Ok(StoredOp {
        version: from_sql_seq(seq)?,
        json: RawValue::from_string(body)
            .map_err(|e| StoreError::Corrupt(format!("operation {seq}: {e}")))?,
    })
}

/// A fetch request that can move to a blocking thread.
struct OwnedFetch {
    since: u64,
    limit: Option<usize>,
    exclude_device: String,
    tombstone_cutoff: i64,
    patches: bool,
}

fn key_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = row.get(2)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        fingerprint: fingerprint(&hash),
        created_at: row.get(3)?,
        revoked_at: row.get(4)?,
    })
}

const KEY_COLUMNS: &str = "SELECT id, name, key_hash, created_at, revoked_at FROM api_keys";

impl Storage for SqliteStore {
    async fn namespace_for_key(&self, hash: KeyHash) -> Result<Option<NamespaceId>, StoreError> {
        self.read(move |conn| {
            let found = conn
                .prepare_cached(
                    "SELECT id, key_hash FROM api_keys WHERE key_hash = ?1 AND revoked_at IS NULL",
                )?
                .query_row([hash.as_slice()], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
                })
                .optional()?;
            Ok(found.and_then(|(id, stored)| hashes_match(&stored, &hash).then_some(id)))
        })
        .await
    }

    async fn push(
        &self,
        ns: NamespaceId,
        device_id: String,
        ops: Vec<Operation>,
        received_at: i64,
    ) -> Result<PushOutcome, StoreError> {
        self.write(move |conn| push_blocking(conn, ns, &device_id, ops, received_at))
            .await
    }

    async fn fetch(
        &self,
        ns: NamespaceId,
        request: FetchRequest<'_>,
    ) -> Result<FetchPage, StoreError> {
        let request = OwnedFetch {
            since: request.since,
            limit: request.limit,
            exclude_device: request.exclude_device.unwrap_or_default().to_owned(),
            tombstone_cutoff: request.tombstone_cutoff,
            patches: request.patches,
        };
        self.read(move |conn| fetch_blocking(conn, ns, request))
            .await
    }

    async fn version(&self, ns: NamespaceId) -> Result<u64, StoreError> {
        self.read(move |conn| {
            let seq: Option<i64> = conn
                .prepare_cached("SELECT seq FROM namespaces WHERE ns = ?1")?
                .query_row([ns], |row| row.get(0))
                .optional()?;
            from_sql_seq(seq.unwrap_or(0))
        })
        .await
    }

    async fn operations_between(
        &self,
        ns: NamespaceId,
        from: u64,
        to: u64,
    ) -> Result<Vec<StoredOp>, StoreError> {
        self.read(move |conn| {
            let mut query = conn.prepare_cached(
                "SELECT seq, body FROM operations INDEXED BY operations_live
                 WHERE ns = ?1 AND live = 1 AND seq BETWEEN ?2 AND ?3 ORDER BY seq",
            )?;
            let rows = query.query_map(params![ns, to_sql_seq(from), to_sql_seq(to)], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?;
            rows.map(|row| {
                let (seq, body) = row?;
                stored_op(seq, body)
            })
            .collect()
        })
        .await
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    async fn add_key(
        &self,
        name: String,
        hash: KeyHash,
        created_at: i64,
    ) -> Result<KeyRecord, StoreError> {
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO api_keys (name, key_hash, created_at) VALUES (?1, ?2, ?3)",
                params![name, hash.as_slice(), created_at],
            );
            match inserted {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    return Err(StoreError::DuplicateKey);
                }
                other => other?,
            };
            let id = conn.last_insert_rowid();
            Ok(conn.query_row(&format!("{KEY_COLUMNS} WHERE id = ?1"), [id], key_record)?)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|conn| {
            let mut query = conn.prepare(&format!("{KEY_COLUMNS} ORDER BY id"))?;
            let keys = query
                .query_map([], key_record)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(keys)
        })
        .await
    }

    async fn revoke_key(&self, selector: String, revoked_at: i64) -> Result<KeyRecord, StoreError> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let keys = tx
                .prepare(&format!("{KEY_COLUMNS} ORDER BY id"))?
                .query_map([], key_record)?
                .collect::<Result<Vec<_>, _>>()?;
            let id = select_key(&keys, &selector)?;
            tx.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1",
                params![id, revoked_at],
            )?;
            let record = tx.query_row(&format!("{KEY_COLUMNS} WHERE id = ?1"), [id], key_record)?;
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    fn remote_pushes(&self) -> Option<mpsc::Receiver<PushNotice>> {
        None
    }
}
