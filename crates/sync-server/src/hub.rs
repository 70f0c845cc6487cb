//! Fan-out of accepted operations to the WebSocket clients of a namespace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::{Message, Utf8Bytes};
use sync_core::wire::ServerMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{NamespaceId, StoredOp};

/// Identifies one WebSocket connection.
pub type ConnectionId = u64;

/// What a connection's writer task sends.
#[derive(Debug)]
pub enum Outbound {
    Message(Message),
    /// Send a close frame and stop.
    Close {
        code: u16,
        reason: &'static str,
    },
}

/// The device a connection belongs to, learnt from its messages.
pub type DeviceCell = Arc<Mutex<Option<String>>>;

struct Subscriber {
    device: DeviceCell,
    outbox: mpsc::Sender<Outbound>,
    /// Cancelled when the client reads too slowly to keep up.
    evict: CancellationToken,
}

#[derive(Default)]
pub struct Hub {
    namespaces: Mutex<HashMap<NamespaceId, HashMap<ConnectionId, Subscriber>>>,
    next_id: AtomicU64,
}

/// Keeps a connection subscribed; unsubscribes when dropped.
pub struct Subscription {
    hub: Arc<Hub>,
    ns: NamespaceId,
    pub id: ConnectionId,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut namespaces = self.hub.lock();
        if let Some(subscribers) = namespaces.get_mut(&self.ns) {
            subscribers.remove(&self.id);
            if subscribers.is_empty() {
                namespaces.remove(&self.ns);
            }
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<NamespaceId, HashMap<ConnectionId, Subscriber>>> {
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn subscribe(
        self: &Arc<Self>,
        ns: NamespaceId,
        device: DeviceCell,
        outbox: mpsc::Sender<Outbound>,
        evict: CancellationToken,
    ) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(ns).or_default().insert(
            id,
            Subscriber {
                device,
                outbox,
                evict,
            },
        );
        Subscription {
            hub: Arc::clone(self),
            ns,
            id,
        }
    }

    pub fn has_subscribers(&self, ns: NamespaceId) -> bool {
        self.lock().contains_key(&ns)
    }

    /// Sends a `remote_change` for each operation to every connection of the
    /// namespace except `origin` and connections of the pushing device. Never
    /// waits: a connection whose queue is full is evicted (it will resync on
    /// reconnect). Returns the number of messages queued.
    pub fn publish(
        &self,
        ns: NamespaceId,
        origin: Option<ConnectionId>,
        pusher: &str,
        ops: &[StoredOp],
    ) -> u64 {
        if ops.is_empty() {
            return 0;
        }
        let namespaces = self.lock();
        let Some(subscribers) = namespaces.get(&ns) else {
            return 0;
        };
        let recipients: Vec<&Subscriber> = subscribers
            .iter()
            .filter(|(id, sub)| {
                Some(**id) != origin
                    && sub
                        .device
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_deref()
                        != Some(pusher)
            })
            .map(|(_, sub)| sub)
            .collect();
        if recipients.is_empty() {
            return 0;
        }
        let mut sent = 0;
        for op in ops {
            let message: ServerMessage<&serde_json::value::RawValue> =
                ServerMessage::RemoteChange {
                    operation: &op.json,
                };
            let Ok(text) = serde_json::to_string(&message) else {
                continue;
            };
            let text = Utf8Bytes::from(text);
            for sub in &recipients {
                if sub.evict.is_cancelled() {
                    continue;
                }
                match sub
                    .outbox
                    .try_send(Outbound::Message(Message::Text(text.clone())))
                {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(
                            ns,
                            "evicting a WebSocket client that is not reading its messages"
                        );
                        sub.evict.cancel();
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        sent
    }
}
