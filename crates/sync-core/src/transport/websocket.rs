//! WebSocket client for the sync server, on tokio-tungstenite.
//!
//! [`WsClient::connect`] dials, authenticates (`auth` → `auth_ok`) and hands the
//! socket to a background task that owns it from then on. The task:
//! - answers requests: each gets an integer `request_id`; answers are matched
//!   by id, and answers without one (old servers) go to the oldest request
//!   waiting for that answer type;
//! - sends a WebSocket ping every `ping_interval` and drops a connection that
//!   has been silent for `ping_interval + response_timeout`;
//! - when the connection drops and `reconnect` is set, reconnects with capped
//!   exponential backoff (`min(2^(n-1), max_reconnect_delay)` seconds) and
//!   resumes: it fetches everything after the last version it delivered and
//!   delivers it as [`WsEvent::RemoteChange`], so no change is missed;
//! - queues [`WsEvent`]s (remote changes, connection changes, unsolicited
//!   server messages) for the owner to take with [`WsClient::try_event`] /
//!   [`WsClient::next_event`]. Nothing is called back from the task;
//! - compresses (unless `compression` is off): `auth` offers
//!   `"compression": ["gzip"]`; when `auth_ok`
//!   accepts it, messages larger than [`MIN_COMPRESS_BYTES`] go both ways as
//!   binary frames holding the gzip-compressed JSON (tungstenite has no
//!   permessage-deflate). Servers that do not answer the offer get text only.
//!
//! Call `connect` from inside a tokio runtime: the task is spawned on it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::compression::{self, MIN_COMPRESS_BYTES};
use super::{format_seconds, tls, Traffic, TrafficCounter};
use crate::protocol::Operation;
use crate::value::{Map, Value};
use crate::wire::{FetchResponse, PushResponse};

/// Why a WebSocket call failed.
#[derive(Debug, Error)]
pub enum WsError {
    #[error("Connection failed: {0}")]
    Connect(String),
    #[error("Authentication failed: {0}")]
    AuthFailed(String),
    #[error("Authentication timeout")]
    AuthTimeout,
    #[error("Not connected or not authenticated")]
    NotConnected,
    #[error("Response timeout: no {expected} within {}", format_seconds(*.after))]
    Timeout { expected: String, after: Duration },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// An `error` message from the server.
    #[error("{0}")]
    Server(String),
    #[error("Invalid response: {0}")]
    InvalidResponse(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Settings of a [`WsClient`]; [`WsConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// `ws://` or `wss://` URL of the server's WebSocket endpoint.
    pub url: String,
    pub api_key: String,
    /// Sent with `auth` (so the server skips this device's own pushes) and used to resume.
    pub device_id: Option<String>,
    /// Reconnect when an established connection drops (default true).
    pub reconnect: bool,
    /// Heartbeat ping period (default 30 s).
    pub ping_interval: Duration,
    /// Wait for an answer, and for authentication (default 5 s).
    pub response_timeout: Duration,
    /// Cap of the reconnect backoff (default 30 s).
    pub max_reconnect_delay: Duration,
    pub ca_file: Option<PathBuf>,
    /// Largest message accepted (default 64 MiB).
    pub max_message_bytes: usize,
    /// Version the caller has already seen: resuming fetches after it.
    pub resume_from: u64,
    /// Offer gzip frames in `auth` (default true).
    pub compression: bool,
}

impl WsConfig {
    pub fn new(url: impl Into<String>, api_key: impl Into<String>) -> Self {
        WsConfig {
            url: url.into(),
            api_key: api_key.into(),
            device_id: None,
            reconnect: true,
            ping_interval: Duration::from_secs(30),
            response_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(30),
            ca_file: None,
            max_message_bytes: 64 * 1024 * 1024,
            resume_from: 0,
            compression: true,
        }
    }
}

/// What happened on the connection, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    /// Reconnected and authenticated again (the first connection is `connect`'s result).
    Connected,
    Disconnected {
        reason: String,
    },
    Reconnecting {
        attempt: u32,
        delay: Duration,
    },
    /// A server message that is neither an answer to a request nor a remote change.
    Message(Value),
    /// An operation another device pushed (live, or caught up after a reconnect).
    RemoteChange(Value),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Socket = WebSocketStream<Box<dyn Io>>;

/// An authenticated socket and whether the server accepted gzip frames.
struct Session {
    socket: Socket,
    gzip: bool,
}

/// A message as it goes on the wire: gzip in a binary frame when the
/// session compresses and the message is large.
fn frame(text: String, gzip: bool) -> Message {
    if gzip && text.len() > MIN_COMPRESS_BYTES {
        if let Ok(packed) = compression::gzip(text.as_bytes()) {
            return Message::binary(packed);
        }
    }
    Message::text(text)
}

/// Payload bytes of a data frame.
fn wire_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(data) => data.len(),
        _ => 0,
    }
}

/// A request waiting for its answer.
struct Waiting {
    id: u64,
    expected: &'static str,
    reply: oneshot::Sender<Result<Value, WsError>>,
}

struct Shared {
    waiting: Mutex<Vec<Waiting>>,
    connected: AtomicBool,
    /// Highest operation version delivered (remote changes, fetched operations).
    delivered: AtomicU64,
    device_id: Mutex<Option<String>>,
    traffic: TrafficCounter,
}

impl Shared {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn device(&self) -> Option<String> {
        self.device_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn fail_all(&self, reason: &str) {
        for waiting in self.waiting().drain(..) {
            let _ = waiting
                .reply
                .send(Err(WsError::ConnectionLost(reason.to_owned())));
        }
    }

    /// Completes the request a message answers, if any; true when it did.
    fn complete(&self, message: &Value) -> bool {
        let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
        let id = message.get("request_id").and_then(Value::as_i64);
        let mut waiting = self.waiting();
        let position = match id {
            Some(id) => waiting.iter().position(|w| w.id as i64 == id),
            None if kind == "error" => (!waiting.is_empty()).then_some(0),
            None => waiting.iter().position(|w| w.expected == kind),
        };
        let Some(position) = position else {
            return false;
        };
        let entry = waiting.remove(position);
        let result = if kind == "error" {
            Err(WsError::Server(
                message
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown error")
                    .to_owned(),
            ))
        } else {
            Ok(message.clone())
        };
        let _ = entry.reply.send(result);
        true
    }
}

enum Command {
    Send(String),
    Close,
}

/// A live, self-healing connection to the sync server.
pub struct WsClient {
    config: WsConfig,
    commands: mpsc::UnboundedSender<Command>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<WsEvent>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
}

impl Drop for WsClient {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close);
    }
}

fn operation_version(op: &Value) -> Option<u64> {
    op.get("version")
        .and_then(Value::as_i64)
        .and_then(|v| u64::try_from(v).ok())
}

/// Dials and authenticates.
async fn dial(config: &WsConfig) -> Result<Session, WsError> {
    let url = &config.url;
    let request = url
        .as_str()
        .into_client_request()
        .map_err(|e| WsError::Connect(format!("invalid URL {url}: {e}")))?;
    let uri = request.uri();
    let secure = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| WsError::Connect(format!("no host in {url}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let limit = config.response_timeout;
    let tcp = match timeout(limit, TcpStream::connect((host.as_str(), port))).await {
        Err(_) => {
            return Err(WsError::Connect(format!(
                "timed out after {} connecting to {url}",
                format_seconds(limit)
            )))
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(WsError::Connect(format!("connection refused to {url}")))
        }
        Ok(Err(e)) => return Err(WsError::Connect(format!("cannot connect to {url}: {e}"))),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if secure {
        let tls = tls::client_config(config.ca_file.as_deref())?;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| WsError::Connect(format!("invalid host {host}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| WsError::Connect(format!("TLS handshake with {url} failed: {e}")))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(config.max_message_bytes);
    ws_config.max_frame_size = Some(config.max_message_bytes);
    let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config));
    let (mut socket, _) = match timeout(limit, handshake).await {
        Err(_) => return Err(WsError::Connect(format!("handshake with {url} timed out"))),
        Ok(Err(e)) => {
            return Err(WsError::Connect(format!(
                "handshake with {url} failed: {e}"
            )))
        }
        Ok(Ok(pair)) => pair,
    };
    let mut auth = Map::from([
        ("type".to_owned(), Value::from("auth")),
        ("api_key".to_owned(), Value::Str(config.api_key.clone())),
    ]);
    if let Some(device) = &config.device_id {
        auth.insert("device_id".to_owned(), Value::Str(device.clone()));
    }
    if config.compression {
        auth.insert(
            "compression".to_owned(),
            Value::Array(vec![Value::from(compression::GZIP)]),
        );
    }
    let text =
        serde_json::to_string(&Value::Object(auth)).map_err(|e| WsError::Encode(e.to_string()))?;
    socket
        .send(Message::text(text))
        .await
        .map_err(|e| WsError::Connect(format!("sending auth to {url}: {e}")))?;
    let answer = async {
        while let Some(frame) = socket.next().await {
            let frame = frame.map_err(|e| WsError::Connect(format!("{url}: {e}")))?;
            let text = match frame {
                Message::Text(text) => text,
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            match message.get("type").and_then(Value::as_str) {
                Some("auth_ok") => {
                    return Ok(message.get("compression").and_then(Value::as_str)
                        == Some(compression::GZIP))
                }
                Some("auth_failed") => {
                    let reason = message
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("Unknown");
                    return Err(WsError::AuthFailed(reason.to_owned()));
                }
                _ => {}
            }
        }
        Err(WsError::Connect(format!(
            "{url} closed the connection during authentication"
        )))
    };
    match timeout(limit, answer).await {
        Err(_) => Err(WsError::AuthTimeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(gzip)) => Ok(Session { socket, gzip }),
    }
}

impl WsClient {
    /// Connects and authenticates, then starts the background task (on the
    /// current tokio runtime). Fails without retrying.
    pub async fn connect(config: WsConfig) -> Result<WsClient, WsError> {
        let session = dial(&config).await?;
        let (commands, command_queue) = mpsc::unbounded_channel();
        let (event_queue, events) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            waiting: Mutex::new(Vec::new()),
            connected: AtomicBool::new(true),
            delivered: AtomicU64::new(config.resume_from),
            device_id: Mutex::new(config.device_id.clone()),
            traffic: TrafficCounter::default(),
        });
        let task = Task {
            config: config.clone(),
            shared: Arc::clone(&shared),
            commands: command_queue,
            events: event_queue,
            resume_serial: 0,
        };
        tokio::spawn(task.run(session));
        Ok(WsClient {
            config,
            commands,
            events: tokio::sync::Mutex::new(events),
            shared,
            next_id: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &WsConfig {
        &self.config
    }

    /// Connected and authenticated right now (false while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Highest operation version delivered so far.
    pub fn last_version(&self) -> u64 {
        self.shared.delivered.load(Ordering::Acquire)
    }

    pub fn traffic(&self) -> Traffic {
        self.shared.traffic.get()
    }

    /// Closes the connection and stops reconnecting.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }

    /// The next queued event, without waiting (`None` also while another
    /// caller is waiting in [`WsClient::next_event`]).
    pub fn try_event(&self) -> Option<WsEvent> {
        self.events.try_lock().ok()?.try_recv().ok()
    }

    /// Waits up to `wait` for the next event; `None` when none came or the
    /// connection is closed for good.
    pub async fn next_event(&self, wait: Duration) -> Option<WsEvent> {
        let mut events = self.events.lock().await;
        timeout(wait, events.recv()).await.ok().flatten()
    }

    /// Sends `{type = kind, request_id, ...fields}` and waits up to `wait` for
    /// the answer (`sync_response` for `sync_request`, `push_response` for
    /// `push_operations`, `pong` for `ping`). A server `error` answer is an error.
    pub async fn request(&self, kind: &str, fields: Map, wait: Duration) -> Result<Value, WsError> {
        let expected = match kind {
            "sync_request" => "sync_response",
            "push_operations" => "push_response",
            _ => "pong",
        };
        if !self.is_connected() {
            return Err(WsError::NotConnected);
        }
        if let Some(Value::Str(device)) = fields.get("device_id") {
            *self
                .shared
                .device_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(device.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = fields;
        message.insert("type".to_owned(), Value::from(kind));
        message.insert("request_id".to_owned(), Value::Int(id as i64));
        let text = serde_json::to_string(&Value::Object(message))
            .map_err(|e| WsError::Encode(e.to_string()))?;
        let (reply, answer) = oneshot::channel();
        self.shared.waiting().push(Waiting {
            id,
            expected,
            reply,
        });
        if self.commands.send(Command::Send(text)).is_err() {
            self.shared.waiting().retain(|w| w.id != id);
            return Err(WsError::NotConnected);
        }
        match timeout(wait, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(WsError::ConnectionLost("the connection closed".to_owned())),
            Err(_) => {
                self.shared.waiting().retain(|w| w.id != id);
                Err(WsError::Timeout {
                    expected: expected.to_owned(),
                    after: wait,
                })
            }
        }
    }

    /// Operations after `since` (one page when `limit` is set).
    pub async fn fetch_operations(
        &self,
        device_id: &str,
        since: u64,
        limit: Option<u64>,
    ) -> Result<FetchResponse, WsError> {
        self.fetch_page(device_id, since, limit, false).await
    }

    /// As [`WsClient::fetch_operations`]; with `patches`, updates
    /// may arrive as patches (see [`crate::patch`]).
    pub async fn fetch_page(
        &self,
        device_id: &str,
        since: u64,
        limit: Option<u64>,
        patches: bool,
    ) -> Result<FetchResponse, WsError> {
        let mut fields = Map::from([
            ("device_id".to_owned(), Value::from(device_id)),
            ("since_version".to_owned(), Value::Int(since as i64)),
        ]);
        if let Some(limit) = limit {
            fields.insert("limit".to_owned(), Value::Int(limit as i64));
        }
        if patches {
            fields.insert("patches".to_owned(), Value::Bool(true));
        }
        let answer = self
            .request("sync_request", fields, self.config.response_timeout)
            .await?;
        check_fetch(&answer).map_err(WsError::InvalidResponse)?;
        typed(answer)
    }

    /// Pushes operations; conflicts are in the answer.
    pub async fn push_operations(
        &self,
        device_id: &str,
        operations: &[Operation],
    ) -> Result<PushResponse, WsError> {
        let ops = serde_json::to_value(operations)
            .and_then(serde_json::from_value::<Value>)
            .map_err(|e| WsError::Encode(e.to_string()))?;
        let fields = Map::from([
            ("device_id".to_owned(), Value::from(device_id)),
            ("operations".to_owned(), ops),
        ]);
        let answer = self
            .request("push_operations", fields, self.config.response_timeout)
            .await?;
        typed(answer)
    }

    /// The server's current sequence number (a fetch after the largest
    /// version JSON numbers hold exactly, which returns no operations).
    pub async fn server_version(&self, device_id: &str) -> Result<u64, WsError> {
        let fields = Map::from([
            ("device_id".to_owned(), Value::from(device_id)),
            ("since_version".to_owned(), Value::Int(VERSION_PROBE)),
        ]);
        let answer = self
            .request("sync_request", fields, self.config.response_timeout)
            .await?;
        answer
            .get("version")
            .and_then(Value::as_i64)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| WsError::InvalidResponse("missing version number".to_owned()))
    }
}

/// `since_version` of a request that only asks for the server's version.
pub const VERSION_PROBE: i64 = (1 << 53) - 1;

/// The old validation of a fetch answer.
pub fn check_fetch(answer: &Value) -> Result<(), String> {
    match answer.get("operations") {
        Some(Value::Array(_)) => {}
        Some(Value::Object(map)) if map.is_empty() => {}
        _ => return Err("missing operations array".to_owned()),
    }
    match answer.get("version") {
        Some(Value::Int(_) | Value::Float(_)) => Ok(()),
        _ => Err("missing version number".to_owned()),
    }
}

fn typed<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, WsError> {
    serde_json::to_value(&answer)
        .and_then(serde_json::from_value)
        .map_err(|e| WsError::InvalidResponse(e.to_string()))
}

/// The background task owning the socket.
struct Task {
    config: WsConfig,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<WsEvent>,
    resume_serial: u64,
}

/// How a session ended.
enum End {
    Closed,
    Lost(String),
}

impl Task {
    fn emit(&self, event: WsEvent) {
        let _ = self.events.send(event);
    }

    async fn run(mut self, mut connection: Session) {
        let mut resume = false;
        loop {
            let reason = match self.session(&mut connection, resume).await {
                End::Closed => {
                    let _ = connection.socket.close(None).await;
                    break;
                }
                End::Lost(reason) => reason,
            };
            self.shared.connected.store(false, Ordering::Release);
            self.shared.fail_all(&reason);
            self.emit(WsEvent::Disconnected { reason });
            if !self.config.reconnect {
                break;
            }
            match self.reconnect().await {
                Some(next) => connection = next,
                None => break,
            }
            self.shared.connected.store(true, Ordering::Release);
            self.emit(WsEvent::Connected);
            resume = true;
        }
        self.shared.connected.store(false, Ordering::Release);
        self.shared.fail_all("the connection closed");
    }

    /// Redials with backoff until it works, authentication is refused, or the owner closes.
    async fn reconnect(&mut self) -> Option<Session> {
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let delay = Duration::from_secs(1u64 << (attempt - 1).min(20))
                .min(self.config.max_reconnect_delay);
            self.emit(WsEvent::Reconnecting { attempt, delay });
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    command = self.commands.recv() => match command {
                        None | Some(Command::Close) => return None,
                        Some(Command::Send(_)) => {} // requests fail while disconnected
                    },
                }
            }
            let mut config = self.config.clone();
            config.device_id = self.shared.device();
            match dial(&config).await {
                Ok(session) => return Some(session),
                Err(WsError::AuthFailed(reason)) => {
                    self.emit(WsEvent::Disconnected {
                        reason: format!("Authentication failed: {reason}"),
                    });
                    return None;
                }
                Err(_) => {}
            }
        }
    }

    /// Asks for everything after the last delivered version.
    async fn send_resume(&mut self, connection: &mut Session, since: u64) -> Result<(), String> {
        let Some(device) = self.shared.device() else {
            return Ok(());
        };
        self.resume_serial += 1;
        let message = Map::from([
            ("type".to_owned(), Value::from("sync_request")),
            (
                "request_id".to_owned(),
                Value::Str(format!("resume-{}", self.resume_serial)),
            ),
            ("device_id".to_owned(), Value::Str(device)),
            ("since_version".to_owned(), Value::Int(since as i64)),
        ]);
        let text = serde_json::to_string(&Value::Object(message)).map_err(|e| e.to_string())?;
        let message = frame(text, connection.gzip);
        self.shared.traffic.add(wire_len(&message), 0);
        connection
            .socket
            .send(message)
            .await
            .map_err(|e| e.to_string())
    }

    async fn session(&mut self, connection: &mut Session, resume: bool) -> End {
        if resume {
            let since = self.shared.delivered.load(Ordering::Acquire);
            if let Err(e) = self.send_resume(connection, since).await {
                return End::Lost(e);
            }
        }
        let period = self.config.ping_interval.max(Duration::from_millis(100));
        let silence = period + self.config.response_timeout;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                frame = connection.socket.next() => {
                    let frame = match frame {
                        None => return End::Lost("the server closed the connection".to_owned()),
                        Some(Err(e)) => return End::Lost(e.to_string()),
                        Some(Ok(frame)) => frame,
                    };
                    last_heard = Instant::now();
                    match frame {
                        Message::Text(text) => {
                            self.shared.traffic.add(0, text.len());
                            if let Err(e) = self.on_text(connection, &text).await {
                                return End::Lost(e);
                            }
                        }
                        Message::Binary(data) if connection.gzip => {
                            self.shared.traffic.add(0, data.len());
                            let limit = self.config.max_message_bytes;
                            let text = compression::gunzip(&data, limit)
                                .map_err(|e| e.to_string())
                                .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()));
                            match text {
                                Ok(text) => {
                                    if let Err(e) = self.on_text(connection, &text).await {
                                        return End::Lost(e);
                                    }
                                }
                                Err(e) => return End::Lost(format!("undecodable compressed message: {e}")),
                            }
                        }
                        Message::Close(frame) => {
                            let reason = frame
                                .map(|f| f.reason.to_string())
                                .filter(|r| !r.is_empty())
                                .unwrap_or_else(|| "the server closed the connection".to_owned());
                            return End::Lost(reason);
                        }
                        _ => {}
                    }
                }
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return End::Closed,
                    Some(Command::Send(text)) => {
                        let message = frame(text, connection.gzip);
                        self.shared.traffic.add(wire_len(&message), 0);
                        if let Err(e) = connection.socket.send(message).await {
                            return End::Lost(e.to_string());
                        }
                    }
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence {
                        return End::Lost(format!(
                            "no answer to heartbeat for {}",
                            format_seconds(silence)
                        ));
                    }
                    if let Err(e) = connection.socket.send(Message::Ping(Default::default())).await {
                        return End::Lost(e.to_string());
                    }
                }
            }
        }
    }

    /// Handles one server message.
    async fn on_text(&mut self, connection: &mut Session, text: &str) -> Result<(), String> {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return Ok(());
        };
        let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
        let resume_answer = matches!(
            message.get("request_id"),
            Some(Value::Str(id)) if id.starts_with("resume-")
        );
        if resume_answer {
            if kind != "sync_response" {
                return Ok(());
            }
            let before = self.shared.delivered.load(Ordering::Acquire);
            if let Some(Value::Array(ops)) = message.get("operations") {
                for op in ops {
                    self.deliver(op.clone());
                }
            }
            let has_more = matches!(message.get("has_more"), Some(Value::Bool(true)));
            let after = self.shared.delivered.load(Ordering::Acquire);
            if has_more && after > before {
                self.send_resume(connection, after).await?;
            }
            return Ok(());
        }
        match kind {
            "remote_change" => {
                if let Some(op) = message.get("operation") {
                    let seen = self.shared.delivered.load(Ordering::Acquire);
                    if operation_version(op).is_none_or(|v| v > seen) {
                        self.deliver(op.clone());
                    }
                }
            }
            "sync_response" => {
                if let Some(Value::Array(ops)) = message.get("operations") {
                    let top = ops.iter().filter_map(operation_version).max();
                    if let Some(top) = top {
                        self.shared.delivered.fetch_max(top, Ordering::AcqRel);
                    }
                }
                if !self.shared.complete(&message) {
                    self.emit(WsEvent::Message(message));
                }
            }
            _ => {
                if !self.shared.complete(&message) {
                    self.emit(WsEvent::Message(message));
                }
            }
        }
        Ok(())
    }

    fn deliver(&self, op: Value) {
        if let Some(version) = operation_version(&op) {
            self.shared.delivered.fetch_max(version, Ordering::AcqRel);
        }
        self.emit(WsEvent::RemoteChange(op));
    }
}
