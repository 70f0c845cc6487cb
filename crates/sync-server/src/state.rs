//! Shared server state and the operations HTTP and WebSocket handlers have in common.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sync_core::patch::PATCH;
use sync_core::protocol::now_seconds;
use sync_core::wire::{AcceptedOperation, PushResponse};
use sync_core::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blobs::BlobStore;
use crate::config::Settings;
use crate::hub::{ConnectionId, Hub};
use crate::keys;
use crate::metrics::Metrics;
use crate::store::{FetchPage, FetchRequest, NamespaceId, PushOutcome, Storage, StoreError};
use crate::validate::Push;

pub struct AppState<S> {
    pub store: S,
    pub settings: Settings,
    /// Large assets; `None` when no blob directory is configured.
    pub blobs: Option<Arc<BlobStore>>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// WebSocket sessions, so shutdown can wait for them to finish.
    pub sessions: TaskTracker,
}

impl<S: Storage> AppState<S> {
    pub fn new(store: S, settings: Settings) -> Arc<Self> {
        let blobs = settings
            .blobs
            .dir
            .clone()
            .map(|dir| Arc::new(BlobStore::new(dir, settings.blobs.clone())));
        Arc::new(AppState {
            store,
            settings,
            blobs,
            hub: Arc::default(),
            metrics: Arc::default(),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
        })
    }

    /// The namespace of an active key.
    pub async fn authenticate(&self, key: &str) -> Result<Option<NamespaceId>, StoreError> {
        self.store.namespace_for_key(keys::hash(key)).await
    }

    /// Stores a validated push and forwards what it stored to the namespace's
    /// other WebSocket clients. `origin` is the pushing WebSocket, if any.
    pub async fn push(
        &self,
        ns: NamespaceId,
        push: Push,
        origin: Option<ConnectionId>,
    ) -> Result<PushOutcome, StoreError> {
        let device_id = push.device_id;
        let outcome = self
            .store
            .push(ns, device_id.clone(), push.operations, now_seconds())
            .await?;
        let stored = outcome.stored.len() as u64;
        let metrics = &self.metrics;
        metrics.pushes.fetch_add(1, Ordering::Relaxed);
        metrics
            .operations_accepted
            .fetch_add(stored, Ordering::Relaxed);
        metrics
            .operations_duplicate
            .fetch_add(outcome.accepted.len() as u64 - stored, Ordering::Relaxed);
        metrics
            .conflicts
            .fetch_add(outcome.conflicts.len() as u64, Ordering::Relaxed);
        metrics
            .patches_applied
            .fetch_add(outcome.patches_applied, Ordering::Relaxed);
        metrics
            .patches_rejected
            .fetch_add(outcome.patches_rejected, Ordering::Relaxed);
        let sent = self.hub.publish(ns, origin, &device_id, &outcome.stored);
        metrics
            .remote_changes_sent
            .fetch_add(sent, Ordering::Relaxed);
        Ok(outcome)
    }

    /// A page of operations after `since`. Without `limit`, everything (old
    /// clients never ask for a next page); a larger `limit` is capped. With
    /// `patches`, patched updates the client can apply come in patched form.
    pub async fn fetch(
        &self,
        ns: NamespaceId,
        since: u64,
        limit: Option<usize>,
        device: Option<&str>,
        patches: bool,
    ) -> Result<FetchPage, StoreError> {
        let retention =
            i64::try_from(self.settings.tombstone_retention.as_secs()).unwrap_or(i64::MAX);
        let request = FetchRequest {
            since,
            limit: limit.map(|l| l.min(self.settings.limits.max_page_size)),
            exclude_device: device.filter(|d| !d.is_empty()),
            tombstone_cutoff: now_seconds().saturating_sub(retention),
            patches,
        };
        self.store.fetch(ns, request).await
    }

    /// Publishes operations another server process stored.
    pub async fn forward_remote_push(
        &self,
        ns: NamespaceId,
        from: u64,
        to: u64,
        pusher: &str,
    ) -> Result<(), StoreError> {
        if !self.hub.has_subscribers(ns) {
            return Ok(());
        }
        let ops = self.store.operations_between(ns, from, to).await?;
        let sent = self.hub.publish(ns, None, pusher, &ops);
        self.metrics
            .remote_changes_sent
            .fetch_add(sent, Ordering::Relaxed);
        Ok(())
    }
}

/// What this server does beyond the old protocol, listed in every fetch answer.
pub fn features() -> Vec<String> {
    vec![PATCH.to_owned()]
}

/// The push answer: the old `{success, conflicts, version}` plus `accepted`.
/// `success` is true when every operation is stored (now or before).
pub fn push_response(outcome: PushOutcome) -> PushResponse {
    let accepted = outcome.accepted.into_iter().map(accepted_value).collect();
    PushResponse {
        success: outcome.conflicts.is_empty(),
        conflicts: outcome.conflicts,
        version: outcome.version,
        extra: Map::from([("accepted".to_owned(), Value::Array(accepted))]),
    }
}

fn accepted_value(accepted: AcceptedOperation) -> Value {
    Value::Object(Map::from([
        ("op_id".to_owned(), Value::Str(accepted.op_id)),
        (
            "version".to_owned(),
            Value::Int(i64::try_from(accepted.version).unwrap_or(i64::MAX)),
        ),
    ]))
}
