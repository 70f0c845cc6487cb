//! The WebSocket endpoint (`/ws`, and `/` for clients configured with the bare server URL).
//!
//! A session: the client's first message must be `auth`; then it may send
//! `sync_request`, `push_operations` and `ping` (answered in order, echoing
//! `request_id`), while the server sends `remote_change` whenever another
//! device of the namespace pushes. Reading and writing run as separate tasks
//! joined by a queue, so fan-out never waits for a request to finish.
//!
//! Compression: a client whose `auth` offers `"compression": ["gzip"]` gets
//! `"compression": "gzip"` in `auth_ok`; from then on messages larger than
//! 1 KiB may travel, both ways, as binary frames holding gzip-compressed JSON
//! (axum's WebSocket has no permessage-deflate). Other clients get text only.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use sync_core::transport::compression::{self, CompressionError, GZIP, MIN_COMPRESS_BYTES};
use sync_core::wire::{ClientMessage, RequestId, ServerMessage};
use sync_core::Operation;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnectionId, DeviceCell, Outbound};
use crate::state::{features, push_response, AppState};
use crate::store::{NamespaceId, Storage};
use crate::validate::{self, check_depth, InvalidInput};

/// Messages queued for one client before it counts as too slow and is evicted.
const OUTBOX_CAPACITY: usize = 4096;

/// How long a closing session waits for its last messages to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Close codes (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

pub async fn upgrade<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => accept(state, ws),
        // Not a WebSocket handshake: a JSON error, like every other HTTP error.
        Err(rejection) => (
            rejection.status(),
            Json(json!({ "error": rejection.body_text() })),
        )
            .into_response(),
    }
}

/// `GET /`: a WebSocket upgrade, or a short description of the server.
pub async fn root<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => accept(state, ws),
        Err(_) => Json(json!({
            "service": "whisker-sync-server",
            "version": env!("CARGO_PKG_VERSION"),
        }))
        .into_response(),
    }
}

fn accept<S: Storage>(state: Arc<AppState<S>>, ws: WebSocketUpgrade) -> Response {
    let max = state.settings.limits.max_body_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let sessions = state.sessions.clone();
            sessions.track_future(session(socket, state))
        })
}

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

async fn session<S: Storage>(socket: WebSocket, state: Arc<AppState<S>>) {
    let (mut sink, mut stream) = socket.split();
    let device: DeviceCell = Arc::new(Mutex::new(None));
    let (ns, gzip) = match timeout(
        state.settings.ws_auth_timeout,
        authenticate(&state, &mut stream, &device),
    )
    .await
    {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(reason)) => return refuse(sink, reason).await,
        Err(_) => return refuse(sink, "authentication timeout").await,
    };
    let ok = ServerMessage::<Operation>::AuthOk {
        compression: gzip.then(|| GZIP.to_owned()),
    };
    if send(&mut sink, &ok).await.is_err() {
        return;
    }

    let (outbox, queue) = mpsc::channel(OUTBOX_CAPACITY);
    let evict = state.shutdown.child_token();
    let subscription = state
        .hub
        .subscribe(ns, Arc::clone(&device), outbox.clone(), evict.clone());
    state
        .metrics
        .websocket_connections
        .fetch_add(1, Ordering::Relaxed);
    let mut writer = tokio::spawn(write_loop(
        sink,
        queue,
        state.settings.ws_ping_interval,
        gzip,
    ));

    let session = Session {
        state: &state,
        ns,
        id: subscription.id,
        device: &device,
        outbox: &outbox,
        gzip,
    };
    let (code, reason) = session.read_loop(&mut stream, &evict).await;
    drop(subscription);
    state
        .metrics
        .websocket_connections
        .fetch_sub(1, Ordering::Relaxed);
    // Queued answers go out before the close frame, unless the client stopped
    // reading: then the connection is dropped after CLOSE_TIMEOUT.
    let closing = async {
        let _ = outbox.send(Outbound::Close { code, reason }).await;
        drop(outbox);
        let _ = (&mut writer).await;
    };
    if timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        writer.abort();
    }
}

/// Waits for the `auth` message and checks its key; returns the namespace
/// and whether the client offered gzip. Control frames are skipped; anything
/// else first is refused.
async fn authenticate<S: Storage>(
    state: &AppState<S>,
    stream: &mut Stream,
    device: &DeviceCell,
) -> Result<(NamespaceId, bool), &'static str> {
    loop {
        let text = match stream.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) | None | Some(Err(_)) => return Err("expected an auth message first"),
        };
        state
            .metrics
            .websocket_messages
            .fetch_add(1, Ordering::Relaxed);
        let Ok(ClientMessage::Auth {
            api_key,
            device_id,
            compression,
        }) = serde_json::from_str(&text)
        else {
            return Err("expected an auth message first");
        };
        let gzip = compression.is_some_and(|offer| offer.iter().any(|c| c == GZIP));
        return match state.authenticate(&api_key).await {
            Ok(Some(ns)) => {
                if let Some(id) =
                    device_id.filter(|d| validate::check_device(d, &state.settings.limits).is_ok())
                {
                    *device.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
                }
                Ok((ns, gzip))
            }
            Ok(None) => Err("invalid API key"),
            Err(e) => {
                tracing::error!(error = %e, "storage failure during WebSocket authentication");
                Err("server error")
            }
        };
    }
}

async fn refuse(mut sink: Sink, reason: &'static str) {
    let message: ServerMessage = ServerMessage::AuthFailed {
        reason: reason.to_owned(),
    };
    let _ = send(&mut sink, &message).await;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_POLICY,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await;
}

async fn send<Op: serde::Serialize>(
    sink: &mut Sink,
    message: &ServerMessage<Op>,
) -> Result<(), axum::Error> {
    sink.send(Message::Text(encode(message).into())).await
}

fn encode<Op: serde::Serialize>(message: &ServerMessage<Op>) -> String {
    serde_json::to_string(message).unwrap_or_else(|e| {
        tracing::error!(error = %e, "encoding a WebSocket message");
        r#"{"type":"error","error":"server error"}"#.to_owned()
    })
}

/// A text message as sent on a session that compresses: large ones become
/// binary frames of gzip-compressed JSON.
fn compressed(message: Message) -> Message {
    match message {
        Message::Text(text) if text.len() > MIN_COMPRESS_BYTES => {
            match compression::gzip(text.as_bytes()) {
                Ok(packed) => Message::Binary(packed.into()),
                Err(e) => {
                    tracing::error!(error = %e, "compressing a WebSocket message");
                    Message::Text(text)
                }
            }
        }
        other => other,
    }
}

/// Sends queued messages and a heartbeat ping, until told to close.
async fn write_loop(
    mut sink: Sink,
    mut queue: mpsc::Receiver<Outbound>,
    ping_interval: Duration,
    gzip: bool,
) {
    let mut heartbeat = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let sent = tokio::select! {
            outbound = queue.recv() => match outbound {
                Some(Outbound::Message(message)) if gzip => sink.send(compressed(message)).await,
                Some(Outbound::Message(message)) => sink.send(message).await,
                Some(Outbound::Close { code, reason }) => {
                    let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
                None => break,
            },
            _ = heartbeat.tick() => sink.send(Message::Ping(Default::default())).await,
        };
        if sent.is_err() {
            break;
        }
    }
}

struct Session<'a, S> {
    state: &'a Arc<AppState<S>>,
    ns: NamespaceId,
    id: ConnectionId,
    device: &'a DeviceCell,
    outbox: &'a mpsc::Sender<Outbound>,
    /// The client accepted gzip binary frames.
    gzip: bool,
}

/// The parts of any message needed to answer it even when the rest is invalid.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    request_id: Option<RequestId>,
}

const MESSAGE_TYPES: [&str; 4] = ["auth", "sync_request", "push_operations", "ping"];

impl<S: Storage> Session<'_, S> {
    /// Answers messages in order until the client leaves or `evict` fires;
    /// returns the close frame to send. A message being answered when `evict`
    /// fires (e.g. a push during shutdown) is finished first.
    async fn read_loop(
        &self,
        stream: &mut Stream,
        evict: &CancellationToken,
    ) -> (u16, &'static str) {
        let idle = self.state.settings.ws_idle_timeout;
        loop {
            let next = tokio::select! {
                biased;
                () = evict.cancelled() => {
                    return if self.state.shutdown.is_cancelled() {
                        (CLOSE_GOING_AWAY, "server shutting down")
                    } else {
                        (CLOSE_TRY_AGAIN_LATER, "too slow to keep up")
                    };
                }
                next = timeout(idle, stream.next()) => next,
            };
            let message = match next {
                Err(_) => return (CLOSE_POLICY, "idle timeout"),
                Ok(None | Some(Err(_))) => return (CLOSE_NORMAL, ""),
                Ok(Some(Ok(message))) => message,
            };
            let answer = match message {
                Message::Text(text) => {
                    self.state
                        .metrics
                        .websocket_messages
                        .fetch_add(1, Ordering::Relaxed);
                    self.answer(&text).await
                }
                Message::Binary(data) if self.gzip => {
                    self.state
                        .metrics
                        .websocket_messages
                        .fetch_add(1, Ordering::Relaxed);
                    let limit = self.state.settings.limits.max_body_bytes;
                    match compression::gunzip(&data, limit).map(String::from_utf8) {
                        Ok(Ok(text)) => self.answer(&text).await,
                        Ok(Err(_)) => error_message(None, "compressed message is not UTF-8 text"),
                        Err(CompressionError::TooLarge { .. }) => {
                            return (CLOSE_TOO_BIG, "message too big");
                        }
                        Err(e) => error_message(None, &format!("undecodable message: {e}")),
                    }
                }
                Message::Binary(_) => {
                    error_message(None, "binary messages are not supported; send JSON text")
                }
                Message::Close(_) => return (CLOSE_NORMAL, ""),
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if self
                .outbox
                .send(Outbound::Message(Message::Text(answer.into())))
                .await
                .is_err()
            {
                return (CLOSE_NORMAL, "");
            }
        }
    }

    async fn answer(&self, text: &str) -> String {
        let limits = &self.state.settings.limits;
        if let Err(e) = check_depth(text.as_bytes(), limits.max_json_depth) {
            return error_message(None, &e.to_string());
        }
        let envelope: Envelope = match serde_json::from_str(text) {
            Ok(envelope) => envelope,
            Err(e) => return error_message(None, &format!("malformed JSON: {e}")),
        };
        let request_id = envelope.request_id;
        let message: ClientMessage = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(e) => {
                let error = match envelope.kind.as_deref() {
                    Some(kind) if MESSAGE_TYPES.contains(&kind) => {
                        format!("invalid {kind} message: {e}")
                    }
                    Some(kind) => format!("unknown message type `{kind}`"),
                    None => "message has no `type`".to_owned(),
                };
                return error_message(request_id, &error);
            }
        };
        match message {
            ClientMessage::Auth { .. } => error_message(request_id, "already authenticated"),
            ClientMessage::Ping { request_id } => {
                encode(&ServerMessage::<Operation>::Pong { request_id })
            }
            ClientMessage::SyncRequest {
                request_id,
                device_id,
                since_version,
                limit,
                patches,
            } => {
                self.sync(request_id, device_id, since_version, limit, patches)
                    .await
            }
            ClientMessage::PushOperations {
                request_id,
                device_id,
                operations,
            } => self.push(request_id, device_id, operations).await,
        }
    }

    fn remember_device(&self, device_id: &str) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        if device.as_deref() != Some(device_id) {
            *device = Some(device_id.to_owned());
        }
    }

    async fn sync(
        &self,
        request_id: Option<RequestId>,
        device_id: Option<String>,
        since: u64,
        limit: Option<u64>,
        patches: bool,
    ) -> String {
        if let Some(device_id) = &device_id {
            if let Err(e) = validate::check_device(device_id, &self.state.settings.limits) {
                return error_message(request_id, &e.to_string());
            }
            self.remember_device(device_id);
        }
        if limit == Some(0) {
            let e = InvalidInput::Query {
                name: "limit",
                reason: "must be at least 1",
            };
            return error_message(request_id, &e.to_string());
        }
        let limit = limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        match self
            .state
            .fetch(self.ns, since, limit, device_id.as_deref(), patches)
            .await
        {
            Ok(page) => {
                let operations: Vec<Box<RawValue>> =
                    page.operations.into_iter().map(|op| op.json).collect();
                encode(&ServerMessage::SyncResponse {
                    request_id,
                    operations,
                    version: page.version,
                    has_more: page.has_more,
                    features: features(),
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "storage failure during sync_request");
                error_message(request_id, "server error")
            }
        }
    }

    async fn push(
        &self,
        request_id: Option<RequestId>,
        device_id: String,
        operations: Vec<Operation>,
    ) -> String {
        let push =
            match validate::check_push(Some(device_id), operations, &self.state.settings.limits) {
                Ok(push) => push,
                Err(e) => return error_message(request_id, &e.to_string()),
            };
        self.remember_device(&push.device_id);
        match self.state.push(self.ns, push, Some(self.id)).await {
            Ok(outcome) => encode(&ServerMessage::<Operation>::PushResponse {
                request_id,
                response: push_response(outcome),
            }),
            Err(e) => {
                tracing::error!(error = %e, "storage failure during push_operations");
                error_message(request_id, "server error")
            }
        }
    }
}

fn error_message(request_id: Option<RequestId>, error: &str) -> String {
    encode(&ServerMessage::<Operation>::Error {
        request_id,
        error: error.to_owned(),
    })
}
