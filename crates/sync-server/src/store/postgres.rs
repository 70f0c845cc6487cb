//! PostgreSQL storage: the scale-out path. Several server processes may share
//! one database: a push locks its namespace's counter row for the whole
//! transaction, so sequence numbers are assigned in commit order without gaps
//! or duplicates whichever process serves the push, and every push sends a
//! `NOTIFY` (delivered at commit) so the other processes can forward it to
//! their WebSocket clients.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use sync_core::patch;
use sync_core::Operation;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, IsolationLevel, NoTls};

use super::sqlite::{finish_page, stored_op};
use super::{
    fingerprint, from_sql_seq, plan_push, select_key, to_sql_seq, ExistingOp, FetchPage,
    FetchRequest, KeyRecord, NamespaceId, NewRow, PushNotice, PushOutcome, Storage, StoreError,
    StoredOp, Supersede,
};
use crate::keys::{hashes_match, KeyHash};

/// The `LISTEN`/`NOTIFY` channel pushes are announced on.
const PUSH_CHANNEL: &str = "whisker_sync_push";
/// Serialises schema creation between processes starting at the same time.
const MIGRATION_LOCK: i64 = 0x5759_534b_5359_4e43;
const POOL_WAIT: Duration = Duration::from_secs(10);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);
/// Notices queued for the fan-out task before the listener waits for it.
const NOTICE_BACKLOG: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE IF NOT EXISTS namespaces (
    ns BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    ns BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    op_id TEXT NOT NULL,
    story_id TEXT NOT NULL,
    op_type TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    live BOOLEAN NOT NULL,
    body TEXT,
    patched_body TEXT,
    patch_base BIGINT,
    PRIMARY KEY (ns, seq)
);
-- Databases created before patched forms were kept.
ALTER TABLE operations ADD COLUMN IF NOT EXISTS patched_body TEXT,
    ADD COLUMN IF NOT EXISTS patch_base BIGINT;
CREATE UNIQUE INDEX IF NOT EXISTS operations_by_id ON operations (ns, op_id);
CREATE INDEX IF NOT EXISTS operations_by_story ON operations (ns, story_id, seq);
CREATE INDEX IF NOT EXISTS operations_live ON operations (ns, seq) WHERE live;
";

const KEY_COLUMNS: &str = "SELECT id, name, key_hash, created_at, revoked_at FROM api_keys";

pub struct PostgresStore {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Tells this process's own notifications apart from other processes'.
    server_id: String,
    listener_started: Mutex<bool>,
}

impl PostgresStore {
    /// Connects, and creates the schema if it is missing.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::DatabaseUrl(e.to_string()))?;
        // Session settings for our own connections:
        // - plan every execution for the table as it is now: a generic plan cached
        //   while the table was small would go on scanning it whole as it grows;
        // - no bitmap scans: every query here is a point lookup or an ordered
        //   range read with LIMIT, and a bitmap scan (chosen when statistics lag
        //   behind a fast-growing table) reads and sorts every matching row.
        const SESSION: &str = "-c plan_cache_mode=force_custom_plan -c enable_bitmapscan=off";
        let options = match config.get_options() {
            Some(given) => format!("{given} {SESSION}"),
            None => SESSION.to_owned(),
        };
        config.options(options);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::DatabaseUrl(e.to_string()))?;
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.query("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        drop(client);
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(StoreError::Entropy)?;
        Ok(PostgresStore {
            pool,
            config,
            server_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            listener_started: Mutex::new(false),
        })
    }
}

fn key_record(row: &tokio_postgres::Row) -> KeyRecord {
    let hash: Vec<u8> = row.get(2);
    KeyRecord {
        id: row.get(0),
        name: row.get(1),
        fingerprint: fingerprint(&hash),
        created_at: row.get(3),
        revoked_at: row.get(4),
    }
}

fn stored_rows(
    rows: Vec<tokio_postgres::Row>,
    seq_col: usize,
    body_col: usize,
) -> Result<Vec<StoredOp>, StoreError> {
    rows.into_iter()
        .filter_map(|row| {
            let seq: Option<i64> = row.get(seq_col);
            let body: Option<String> = row.get(body_col);
            Some((seq?, body?))
        })
        .map(|(seq, body)| stored_op(seq, body))
        .collect()
}

impl Storage for PostgresStore {
    async fn namespace_for_key(&self, hash: KeyHash) -> Result<Option<NamespaceId>, StoreError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .await?;
        let row = client.query_opt(&statement, &[&hash.as_slice()]).await?;
        Ok(row.and_then(|row| {
            let stored: Vec<u8> = row.get(1);
            hashes_match(&stored, &hash).then(|| row.get(0))
        }))
    }

    async fn push(
        &self,
        ns: NamespaceId,
        device_id: String,
        ops: Vec<Operation>,
        received_at: i64,
    ) -> Result<PushOutcome, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Takes the namespace's row lock until commit: pushes to one namespace
        // are serialised across every process sharing the database.
        let lock_namespace = tx
            .prepare_cached(
                "INSERT INTO namespaces (ns, seq) VALUES ($1, 0)
                 ON CONFLICT (ns) DO UPDATE SET seq = namespaces.seq RETURNING seq",
            )
            .await?;
        let start: i64 = tx.query_one(&lock_namespace, &[&ns]).await?.get(0);

        // Arrays are joined with UNNEST rather than matched with `= ANY($2)`:
        // planning `ANY` over a 100-element array costs milliseconds. The
        // lookups are pipelined (sent together, one round trip).
        let ids: Vec<&str> = ops.iter().map(|op| op.id.as_str()).collect();
        let stories: Vec<&str> = ops.iter().map(|op| op.story_id.as_str()).collect();
        let patched_stories: Vec<&str> = ops
            .iter()
            .filter(|op| patch::is_patched(op))
            .map(|op| op.story_id.as_str())
            .collect();
        let (find_ids, find_heads, find_patch_bases) = tokio::try_join!(
            tx.prepare_cached(
                "SELECT o.op_id, o.seq, o.story_id FROM UNNEST($2::text[]) AS i(op_id)
                 JOIN operations o ON o.ns = $1 AND o.op_id = i.op_id",
            ),
            tx.prepare_cached(
                "SELECT o.story_id, MAX(o.seq)
                 FROM (SELECT DISTINCT story_id FROM UNNEST($2::text[]) AS s(story_id)) s
                 JOIN operations o ON o.ns = $1 AND o.story_id = s.story_id
                 GROUP BY o.story_id",
            ),
            tx.prepare_cached(
                "SELECT o.story_id, o.seq, o.body
                 FROM (SELECT DISTINCT story_id FROM UNNEST($2::text[]) AS s(story_id)) s
                 JOIN operations o ON o.ns = $1 AND o.story_id = s.story_id
                   AND o.live AND o.op_type IN ('create', 'update')",
            ),
        )?;
        let id_params: [&(dyn ToSql + Sync); 2] = [&ns, &ids];
        let head_params: [&(dyn ToSql + Sync); 2] = [&ns, &stories];
        let patch_base_params: [&(dyn ToSql + Sync); 2] = [&ns, &patched_stories];
        let (found_ids, found_heads, found_patch_bases) = tokio::try_join!(
            tx.query(&find_ids, &id_params),
            tx.query(&find_heads, &head_params),
            tx.query(&find_patch_bases, &patch_base_params),
        )?;
        let mut existing = HashMap::new();
        for row in found_ids {
            let seq: i64 = row.get(1);
            existing.insert(
                row.get::<_, String>(0),
                ExistingOp {
                    version: from_sql_seq(seq)?,
                    story_id: row.get(2),
                },
            );
        }
        let mut heads = HashMap::new();
        for row in found_heads {
            let seq: i64 = row.get(1);
            heads.insert(row.get::<_, String>(0), from_sql_seq(seq)?);
        }
        let mut patch_bases = HashMap::new();
        for row in found_patch_bases {
            let body: Option<String> = row.get(2);
            if let Some(body) = body {
                patch_bases.insert(row.get::<_, String>(0), stored_op(row.get(1), body)?);
            }
        }

        let plan = plan_push(
            &device_id,
            ops,
            from_sql_seq(start)?,
            &existing,
            &heads,
            &patch_bases,
        )?;
        if !plan.rows.is_empty() {
            let (all, metadata_only): (Vec<_>, Vec<_>) = plan
                .supersede
                .iter()
                .partition(|(_, scope)| *scope == Supersede::All);
            let all: Vec<&str> = all.iter().map(|(story, _)| story.as_str()).collect();
            let metadata_only: Vec<&str> = metadata_only
                .iter()
                .map(|(story, _)| story.as_str())
                .collect();
            let rows = &plan.rows;
            let seqs: Vec<i64> = rows.iter().map(|r| to_sql_seq(r.seq)).collect();
            let op_ids: Vec<&str> = rows.iter().map(|r| r.op_id.as_str()).collect();
            let story_ids: Vec<&str> = rows.iter().map(|r| r.story_id.as_str()).collect();
            let types: Vec<&str> = rows.iter().map(|r| r.op_type.as_str()).collect();
            let live: Vec<bool> = rows.iter().map(|r| r.live).collect();
            let bodies: Vec<Option<&str>> = rows.iter().map(NewRow::body).collect();
            let patched_bodies: Vec<Option<&str>> = rows.iter().map(NewRow::patched_body).collect();
            let patch_bases: Vec<Option<i64>> = rows
                .iter()
                .map(|r| r.patch_base().map(to_sql_seq))
                .collect();
            let notice = PushNotice {
                server: self.server_id.clone(),
                ns,
                from: rows[0].seq,
                to: plan.version,
                device: device_id.clone(),
            };
            let payload = serde_json::to_string(&notice)?;
            // Every write in one statement: one round trip while the namespace is
            // locked. The sub-statements share one snapshot, so the superseding
            // UPDATEs never see the rows inserted beside them (and they touch
            // disjoint stories). The NOTIFY is delivered at commit.
            let write = tx
                .prepare_cached(
                    "WITH superseded AS (
                         UPDATE operations o
                         SET live = false, body = NULL, patched_body = NULL, patch_base = NULL
                         FROM UNNEST($12::text[]) AS s(story_id)
                         WHERE o.ns = $1 AND o.live AND o.story_id = s.story_id
                     ), superseded_metadata AS (
                         UPDATE operations o SET live = false, body = NULL
                         FROM UNNEST($13::text[]) AS s(story_id)
                         WHERE o.ns = $1 AND o.live AND o.op_type = 'metadata_update'
                           AND o.story_id = s.story_id
                     ), inserted AS (
                         INSERT INTO operations
                           (ns, seq, op_id, story_id, op_type, device_id, received_at, live, body,
                            patched_body, patch_base)
                         SELECT $1, u.seq, u.op_id, u.story_id, u.op_type, $2, $3, u.live, u.body,
                                u.patched_body, u.patch_base
                         FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::text[],
                                     $8::bool[], $9::text[], $10::text[], $11::bigint[])
                           AS u(seq, op_id, story_id, op_type, live, body, patched_body, patch_base)
                     ), advanced AS (
                         UPDATE namespaces SET seq = $14 WHERE ns = $1
                     )
                     SELECT pg_notify($15, $16)",
                )
                .await?;
            tx.query(
                &write,
                &[
                    &ns,
                    &device_id,
                    &received_at,
                    &seqs,
                    &op_ids,
                    &story_ids,
                    &types,
                    &live,
                    &bodies,
                    &patched_bodies,
                    &patch_bases,
                    &all,
                    &metadata_only,
                    &to_sql_seq(plan.version),
                    &PUSH_CHANNEL,
                    &payload,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        plan.into_outcome()
    }

    async fn fetch(
        &self,
        ns: NamespaceId,
        request: FetchRequest<'_>,
    ) -> Result<FetchPage, StoreError> {
        let client = self.pool.get().await?;
        // A single statement reads one snapshot: the version and the page agree.
        // A row's patched form (when it has one: `patch_base` is NULL otherwise)
        // goes to a client that applies patches and holds the base.
        let statement = client
            .prepare_cached(
                "SELECT h.head, o.seq, o.body
                 FROM (SELECT COALESCE((SELECT seq FROM namespaces WHERE ns = $1), 0) AS head) h
                 LEFT JOIN LATERAL (
                     SELECT seq,
                            CASE WHEN $7 AND patch_base <= $2 THEN patched_body ELSE body END
                              AS body
                     FROM operations
                     WHERE ns = $1 AND live AND seq > $2 AND device_id <> $3
                       AND NOT ($4 AND op_type = 'delete' AND received_at < $5)
                     ORDER BY seq LIMIT $6
                 ) o ON true",
            )
            .await?;
        let fetch_limit = request
            .limit
            .map(|l| i64::try_from(l.saturating_add(1)).unwrap_or(i64::MAX));
        let rows = client
            .query(
                &statement,
                &[
                    &ns,
                    &to_sql_seq(request.since),
                    &request.exclude_device.unwrap_or_default(),
                    &(request.since == 0),
                    &request.tombstone_cutoff,
                    &fetch_limit,
                    &request.patches,
                ],
            )
            .await?;
        let head: i64 = rows.first().map_or(0, |row| row.get(0));
        let operations = stored_rows(rows, 1, 2)?;
        Ok(finish_page(operations, request.limit, from_sql_seq(head)?))
    }

    async fn version(&self, ns: NamespaceId) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT seq FROM namespaces WHERE ns = $1")
            .await?;
        let seq: Option<i64> = client
            .query_opt(&statement, &[&ns])
            .await?
            .map(|row| row.get(0));
        from_sql_seq(seq.unwrap_or(0))
    }

    async fn operations_between(
        &self,
        ns: NamespaceId,
        from: u64,
        to: u64,
    ) -> Result<Vec<StoredOp>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT seq, body FROM operations WHERE ns = $1 AND live AND seq BETWEEN $2 AND $3 ORDER BY seq",
                &[&ns, &to_sql_seq(from), &to_sql_seq(to)],
            )
            .await?;
        stored_rows(rows, 0, 1)
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn add_key(
        &self,
        name: String,
        hash: KeyHash,
        created_at: i64,
    ) -> Result<KeyRecord, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "INSERT INTO api_keys (name, key_hash, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (key_hash) DO NOTHING RETURNING id, name, key_hash, created_at, revoked_at",
                &[&name, &hash.as_slice(), &created_at],
            )
            .await?;
        row.map(|row| key_record(&row))
            .ok_or(StoreError::DuplicateKey)
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(&format!("{KEY_COLUMNS} ORDER BY id"), &[])
            .await?;
        Ok(rows.iter().map(key_record).collect())
    }

    async fn revoke_key(&self, selector: String, revoked_at: i64) -> Result<KeyRecord, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::Serializable)
            .start()
            .await?;
        let keys: Vec<KeyRecord> = tx
            .query(&format!("{KEY_COLUMNS} ORDER BY id"), &[])
            .await?
            .iter()
            .map(key_record)
            .collect();
        let id = select_key(&keys, &selector)?;
        let row = tx
            .query_one(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1
                 RETURNING id, name, key_hash, created_at, revoked_at",
                &[&id, &revoked_at],
            )
            .await?;
        tx.commit().await?;
        Ok(key_record(&row))
    }

    fn remote_pushes(&self) -> Option<mpsc::Receiver<PushNotice>> {
        let mut started = self
            .listener_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *started {
            return None;
        }
        *started = true;
        let (sender, receiver) = mpsc::channel(NOTICE_BACKLOG);
        tokio::spawn(listen(self.config.clone(), self.server_id.clone(), sender));
        Some(receiver)
    }
}

/// Forwards other processes' push notices until the receiver is dropped,
/// reconnecting (with backoff) when the connection is lost. Notices sent while
/// disconnected are missed; clients still get those operations on their next fetch.
async fn listen(
    config: tokio_postgres::Config,
    server_id: String,
    notices: mpsc::Sender<PushNotice>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        match listen_once(&config, &server_id, &notices).await {
            Ok(ListenEnd::ReceiverGone) => return,
            Ok(ListenEnd::ConnectionClosed) => {
                tracing::warn!("PostgreSQL LISTEN connection closed; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL LISTEN connection failed; retrying in {delay:?}")
            }
        }
        if notices.is_closed() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(LISTEN_RETRY_MAX);
    }
}

enum ListenEnd {
    ReceiverGone,
    ConnectionClosed,
}

async fn listen_once(
    config: &tokio_postgres::Config,
    server_id: &str,
    notices: &mpsc::Sender<PushNotice>,
) -> Result<ListenEnd, tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    // The connection must be polled for queries to make progress; its
    // asynchronous messages (our notifications) come out of the same poll.
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            let end = message.is_err();
            if messages_tx.send(message).is_err() || end {
                break;
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {PUSH_CHANNEL}"))
            .await?;
        tracing::debug!("listening for pushes from other server processes");
        while let Some(message) = messages.recv().await {
            let AsyncMessage::Notification(notification) = message? else {
                continue;
            };
            match serde_json::from_str::<PushNotice>(notification.payload()) {
                Ok(notice) if notice.server == server_id => {}
                Ok(notice) => {
                    if notices.send(notice).await.is_err() {
                        return Ok(ListenEnd::ReceiverGone);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed push notification"),
            }
        }
        Ok(ListenEnd::ConnectionClosed)
    }
    .await;
    driver.abort();
    result
}
