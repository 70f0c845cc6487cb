//! A fault-injecting HTTP and WebSocket proxy on loopback, between a client
//! and the reference server. Requests pass through unchanged until a test
//! injects a fault for the next request of a route: an error status, a TCP
//! reset, a truncated, replaced or oversized answer, an answer that never
//! comes, or the server killed while the request is at the proxy. WebSocket
//! connections are forwarded byte for byte and can be cut in the middle of a
//! frame, in either direction.
//!
//! Every connection task ends when either side closes, when a fault ends it,
//! or with the runtime it runs on; a hanging answer is held for at most
//! [`HANG_LIMIT`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Longest time a [`Fault::Hang`] holds a request.
pub const HANG_LIMIT: Duration = Duration::from_secs(60);
/// Largest HTTP message the proxy reads (bigger ones end the connection).
const MAX_MESSAGE: usize = 128 * 1024 * 1024;

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /operations`
    Fetch,
    /// `POST /operations`
    Push,
    Any,
}

/// What happens to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and body; the server never sees the request.
    Status(u16, &'static str),
    /// The server handles the request; the client gets this status instead.
    StatusAfter(u16, &'static str),
    /// Reset the connection (TCP RST) when the request arrives, or (`after`)
    /// once the server has answered it.
    Reset { after: bool },
    /// The server answers; the client gets the head and half the body. With
    /// `declared_full` the head announces the whole length (the connection
    /// ends mid-body); otherwise it announces the half (complete, cut JSON).
    Truncated { declared_full: bool },
    /// The server answers; the client gets this body instead.
    Body(Vec<u8>),
    /// The request is accepted and never answered.
    Hang,
    /// SIGKILL to `pid` (the server) before the request is forwarded, or
    /// (`after`) once the server has answered it; the client gets no answer.
    Kill { pid: u32, after: bool },
}

/// A direction of a WebSocket connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToClient,
    ToServer,
}

/// A cut armed for the next bytes flowing in one direction.
#[derive(Debug, Clone, Copy)]
struct Cut {
    direction: Direction,
    /// Chunks (on loopback: messages) forwarded whole before the cut one.
    skip: usize,
    /// Bytes of the cut chunk forwarded before the connection is dropped.
    after: usize,
}

#[derive(Default)]
struct Plan {
    faults: Mutex<VecDeque<(Route, Fault)>>,
    ws_cut: Mutex<Option<Cut>>,
    /// Faults applied so far.
    applied: AtomicUsize,
    /// WebSocket connections cut so far.
    cuts: AtomicUsize,
}

impl Plan {
    fn take(&self, route: Route) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let position = faults
            .iter()
            .position(|(r, _)| *r == Route::Any || *r == route)?;
        self.applied.fetch_add(1, Ordering::SeqCst);
        faults.remove(position).map(|(_, fault)| fault)
    }

    fn take_cut(&self, direction: Direction) -> Option<usize> {
        let mut cut = self.ws_cut.lock().unwrap_or_else(PoisonError::into_inner);
        match cut.as_mut() {
            Some(c) if c.direction == direction && c.skip > 0 => {
                c.skip -= 1;
                None
            }
            Some(c) if c.direction == direction => {
                let after = c.after;
                *cut = None;
                self.cuts.fetch_add(1, Ordering::SeqCst);
                Some(after)
            }
            _ => None,
        }
    }
}

/// The proxy; stops accepting when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    plan: Arc<Plan>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on `runtime`.
    pub fn start(runtime: &Handle, upstream: SocketAddr) -> Proxy {
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let plan = Arc::new(Plan::default());
        let shared = Arc::clone(&plan);
        let accept = runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(connection(client, upstream, Arc::clone(&shared)));
            }
        });
        Proxy { addr, plan, accept }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Applies `fault` to the next `times` requests of `route`.
    pub fn inject(&self, route: Route, fault: Fault, times: usize) {
        let mut faults = self
            .plan
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for _ in 0..times {
            faults.push_back((route, fault.clone()));
        }
    }

    /// Drops a WebSocket connection in the middle of a message: the next
    /// `skip` chunks sent in `direction` pass, then `after` bytes of the one
    /// after them, then the connection ends.
    pub fn cut_websocket(&self, direction: Direction, skip: usize, after: usize) {
        *self
            .plan
            .ws_cut
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Cut {
            direction,
            skip,
            after,
        });
    }

    /// Faults injected but not applied yet.
    pub fn unused_faults(&self) -> usize {
        self.plan
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Faults applied so far.
    pub fn applied(&self) -> usize {
        self.plan.applied.load(Ordering::SeqCst)
    }

    /// WebSocket connections cut so far.
    pub fn cuts(&self) -> usize {
        self.plan.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One HTTP/1.1 message: the head as received and the body.
struct Message {
    head: String,
    /// The body as it was on the wire (chunked encoding kept).
    raw_body: Vec<u8>,
    /// The body decoded.
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut bytes = self.head.clone().into_bytes();
        bytes.extend_from_slice(&self.raw_body);
        bytes
    }

    fn route(&self) -> Route {
        let line = self.head.lines().next().unwrap_or_default();
        if line.starts_with("GET /operations") {
            Route::Fetch
        } else if line.starts_with("POST /operations") {
            Route::Push
        } else {
            Route::Any
        }
    }

    fn status(&self) -> u16 {
        self.head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The same answer with another body (`announced` bytes in the head).
    fn with_body(&self, body: &[u8], announced: usize) -> Vec<u8> {
        let mut head = String::new();
        for (i, line) in self.head.split("\r\n").enumerate() {
            let name = line.split(':').next().unwrap_or_default().trim();
            if i > 0
                && (name.eq_ignore_ascii_case("content-length")
                    || name.eq_ignore_ascii_case("transfer-encoding")
                    || name.eq_ignore_ascii_case("content-encoding"))
            {
                continue;
            }
            if line.is_empty() {
                break;
            }
            head.push_str(line);
            head.push_str("\r\n");
        }
        head.push_str(&format!("content-length: {announced}\r\n\r\n"));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

/// A complete answer made up by the proxy.
fn made_up(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} Fault\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn read_line<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line),
    }
}

/// Reads one HTTP/1.1 message (Content-Length or chunked body).
async fn read_message<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    has_body: bool,
) -> Option<Message> {
    let mut head = String::new();
    loop {
        let line = read_line(reader).await?;
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
        if head.len() > 64 * 1024 {
            return None;
        }
    }
    let mut message = Message {
        head,
        raw_body: Vec::new(),
        body: Vec::new(),
    };
    if !has_body || message.status() == 101 {
        return Some(message);
    }
    if message
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let size_line = read_line(reader).await?;
            message.raw_body.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            if message.body.len() + size > MAX_MESSAGE {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await.ok()?;
            message.raw_body.extend_from_slice(&chunk);
            chunk.truncate(size);
            message.body.extend_from_slice(&chunk);
            if size == 0 {
                return Some(message);
            }
        }
    }
    let length: usize = match message.header("content-length") {
        Some(length) => length.parse().ok()?,
        None => 0,
    };
    if length > MAX_MESSAGE {
        return None;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    message.raw_body = body.clone();
    message.body = body;
    Some(message)
}

/// Ends a connection with a TCP reset.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(client: TcpStream, upstream: SocketAddr, plan: Arc<Plan>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return reset(client);
    };
    let mut client = BufReader::new(client);
    let mut server = BufReader::new(server);
    while let Some(request) = read_message(&mut client, true).await {
        let upgrade = request
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        let fault = if upgrade {
            None
        } else {
            plan.take(request.route())
        };
        match fault {
            Some(Fault::Status(status, body)) => {
                if client
                    .get_mut()
                    .write_all(&made_up(status, body))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Some(Fault::Reset { after: false }) => return reset(client.into_inner()),
            Some(Fault::Hang) => {
                // Hold the request until the client gives up (bounded).
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(HANG_LIMIT, async {
                    while let Ok(n) = client.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
                return;
            }
            Some(Fault::Kill { pid, after: false }) => {
                super::kill9(pid);
                return;
            }
            _ => {}
        }
        if server.get_mut().write_all(&request.bytes()).await.is_err() {
            return;
        }
        let Some(answer) = read_message(&mut server, true).await else {
            return;
        };
        let bytes = match fault {
            None => answer.bytes(),
            Some(Fault::StatusAfter(status, body)) => made_up(status, body),
            Some(Fault::Reset { .. }) => return reset(client.into_inner()),
            Some(Fault::Kill { pid, .. }) => {
                super::kill9(pid);
                return;
            }
            Some(Fault::Truncated { declared_full }) => {
                let half = &answer.body[..answer.body.len() / 2];
                let announced = if declared_full {
                    answer.body.len()
                } else {
                    half.len()
                };
                let _ = client
                    .get_mut()
                    .write_all(&answer.with_body(half, announced))
                    .await;
                let _ = client.get_mut().shutdown().await;
                return;
            }
            Some(Fault::Body(body)) => answer.with_body(&body, body.len()),
            Some(Fault::Status(..) | Fault::Hang) => return,
        };
        if client.get_mut().write_all(&bytes).await.is_err() {
            return;
        }
        if upgrade && answer.status() == 101 {
            return websocket(client, server, plan).await;
        }
    }
}

/// Forwards an upgraded connection both ways until one side closes or a cut
/// armed with [`Proxy::cut_websocket`] drops it.
async fn websocket(client: BufReader<TcpStream>, server: BufReader<TcpStream>, plan: Arc<Plan>) {
    // Bytes already read past the heads belong to the WebSocket streams.
    let client_early = client.buffer().to_vec();
    let server_early = server.buffer().to_vec();
    let (client_read, client_write) = client.into_inner().into_split();
    let (server_read, server_write) = server.into_inner().into_split();
    let (stop, stopped) = watch::channel(false);
    let stop = Arc::new(stop);
    let up = pump(
        (client_read, client_early, server_write),
        Direction::ToServer,
        Arc::clone(&plan),
        (Arc::clone(&stop), stopped.clone()),
    );
    let down = pump(
        (server_read, server_early, client_write),
        Direction::ToClient,
        plan,
        (stop, stopped),
    );
    tokio::join!(up, down);
}

/// Bytes flowing one way: where they come from, what was already read, where
/// they go.
type Pipe = (
    tokio::net::tcp::OwnedReadHalf,
    Vec<u8>,
    tokio::net::tcp::OwnedWriteHalf,
);

/// Forwards one direction; when it ends (or is cut) it stops the other one.
async fn pump(
    (mut from, early, mut to): Pipe,
    direction: Direction,
    plan: Arc<Plan>,
    (stop, mut stopped): (Arc<watch::Sender<bool>>, watch::Receiver<bool>),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = early;
    loop {
        if !pending.is_empty() {
            if let Some(after) = plan.take_cut(direction) {
                let _ = to.write_all(&pending[..after.min(pending.len())]).await;
                stop.send_replace(true);
                return;
            }
            if to.write_all(&pending).await.is_err() {
                stop.send_replace(true);
                return;
            }
            pending.clear();
        }
        if *stopped.borrow() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    stop.send_replace(true);
                    return;
                }
                Ok(n) => n,
            },
            _ = stopped.changed() => return,
        };
        pending.extend_from_slice(&buf[..n]);
    }
}
