//! Test support: real server processes on loopback, throwaway databases
//! (SQLite files or PostgreSQL databases in a throwaway cluster), and small
//! HTTP and WebSocket clients. Everything started here is stopped and deleted
//! by `Drop`, also when a test fails; every wait is bounded.

use std::error::Error;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

pub use crate::reliability::{env_count, figure};

pub type TestResult = Result<(), Box<dyn Error + Send + Sync>>;

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_whisker-sync-server");
const PG_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg-cluster.sh");
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

/// A plain error message as a test failure.
pub fn fail(message: impl Into<String>) -> Box<dyn Error + Send + Sync> {
    message.into().into()
}

// ---------------------------------------------------------------- PostgreSQL

/// The throwaway cluster shared by all PostgreSQL tests of this run (each test
/// gets its own database in it). Started on first use, stopped by [`stop_cluster`].
static CLUSTER: Mutex<Option<Result<Cluster, String>>> = Mutex::new(None);
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

struct Cluster {
    dir: TempDir,
    url: String,
}

/// PostgreSQL server binaries are installed (the Debian package `postgresql`).
pub fn postgres_available() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().join("bin/initdb").exists())
        })
        .unwrap_or(false)
        || std::env::var_os("PG_BIN").is_some()
}

fn cluster_url() -> Result<String, String> {
    let mut cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let state = cluster.get_or_insert_with(|| {
        if !postgres_available() {
            return Err("PostgreSQL server binaries are missing: install the Debian package `postgresql` \
                        (scripts/bootstrap.sh does), or set WHISKER_SKIP_PG=1 to skip the PostgreSQL tests"
                .to_owned());
        }
        // Reachable by others: as root the cluster runs as the `postgres` user,
        // which must get into the directory whatever the umask.
        let dir = TempDir::new().map_err(|e| e.to_string())?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let output = Command::new("bash")
            .arg(PG_SCRIPT)
            .arg("start")
            .arg(dir.path().join("cluster"))
            .output()
            .map_err(|e| format!("cannot run {PG_SCRIPT}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "starting the PostgreSQL test cluster failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let url = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Ok(Cluster { dir, url })
    });
    state.as_ref().map(|c| c.url.clone()).map_err(Clone::clone)
}

/// Stops the shared cluster and deletes its files (called once all tests ran).
pub fn stop_cluster() {
    let cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(Ok(cluster)) = cluster {
        let _ = Command::new("bash")
            .arg(PG_SCRIPT)
            .arg("stop")
            .arg(cluster.dir.path().join("cluster"))
            .status();
    }
}

/// Creates an empty database in the shared cluster and returns its URL.
async fn create_database() -> Result<String, Box<dyn Error + Send + Sync>> {
    let admin_url = cluster_url().map_err(fail)?;
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
    );
    let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    drop(client);
    let _ = driver.await;
    Ok(format!(
        "{}/{name}",
        admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(base, _)| base)
    ))
}

// ------------------------------------------------------------------ databases

/// A fresh, empty database for one test.
pub struct Database {
    dir: TempDir,
    url: Option<String>,
}

impl Database {
    pub async fn new(backend: Backend) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(create_database().await?),
        };
        Ok(Database {
            dir: TempDir::new()?,
            url,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command-line arguments that select this database.
    pub fn args(&self) -> Vec<String> {
        match &self.url {
            Some(url) => vec!["--database-url".into(), url.clone()],
            None => vec![
                "--db".into(),
                self.dir.path().join("sync.db").display().to_string(),
            ],
        }
    }

    /// Runs `whisker-sync-server keys <args…>` against this database.
    pub fn keys(&self, args: &[&str]) -> Result<Output, Box<dyn Error + Send + Sync>> {
        let output = run_bounded(
            Command::new(SERVER_BIN)
                .arg("keys")
                .args(args)
                .args(self.args()),
            STARTUP_TIMEOUT,
        )?;
        Ok(output)
    }

    /// Adds a key with a chosen value and returns it.
    pub fn add_key(&self, name: &str, key: &str) -> Result<String, Box<dyn Error + Send + Sync>> {
        let output = self.keys(&["add", name, "--key", key])?;
        if !output.status.success() {
            return Err(fail(format!(
                "keys add failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(key.to_owned())
    }

    /// Starts a server on an ephemeral loopback port.
    pub fn start(&self, extra: &[&str]) -> Result<Server, Box<dyn Error + Send + Sync>> {
        Server::start(&self.args(), extra)
    }

    /// Starts a server logging at `level` (`RUST_LOG`), e.g. `trace`.
    pub fn start_logging(
        &self,
        extra: &[&str],
        level: &str,
    ) -> Result<Server, Box<dyn Error + Send + Sync>> {
        Server::start_with_log_level(&self.args(), extra, level)
    }

    /// The PostgreSQL database's URL (`None` for SQLite).
    pub fn postgres_url(&self) -> Option<&str> {
        self.url.as_deref()
    }
}

/// Runs a command to completion, killing it after `limit`.
pub fn run_bounded(
    command: &mut Command,
    limit: Duration,
) -> Result<Output, Box<dyn Error + Send + Sync>> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().ok_or_else(|| fail("no stdout"))?;
    let mut stderr = child.stderr.take().ok_or_else(|| fail("no stderr"))?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = wait_bounded(&mut child, limit)?;
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn wait_bounded(
    child: &mut Child,
    limit: Duration,
) -> Result<ExitStatus, Box<dyn Error + Send + Sync>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!("process did not finish within {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// -------------------------------------------------------------------- servers

/// A running `whisker-sync-server serve`; killed and cleaned up on drop.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` (or `https://…`).
    pub base: String,
    log_dir: TempDir,
}

impl Server {
    pub fn start(
        database_args: &[String],
        extra: &[&str],
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        Server::start_with_log_level(database_args, extra, "info")
    }

    fn start_with_log_level(
        database_args: &[String],
        extra: &[&str],
        level: &str,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let log_dir = TempDir::new()?;
        let log = std::fs::File::create(log_dir.path().join("server.log"))?;
        let mut child = Command::new(SERVER_BIN)
            .arg("serve")
            .args(database_args)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| fail("no stdout"))?;
        let (first_line, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = first_line.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = Server {
            child: Some(child),
            base: String::new(),
            log_dir,
        };
        match line_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => {
                let base = line
                    .strip_prefix("listening on ")
                    .ok_or_else(|| fail(format!("unexpected first line {line:?}")))?;
                server.base = base.to_owned();
                Ok(server)
            }
            Err(_) => Err(fail(format!("server did not start:\n{}", server.log()))),
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http", "ws", 1))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and waits (bounded) for the exit.
    pub fn stop(mut self, signal_kind: Signal) -> Result<ExitStatus, Box<dyn Error + Send + Sync>> {
        let mut child = self.child.take().ok_or_else(|| fail("already stopped"))?;
        signal(child.id(), signal_kind)?;
        wait_bounded(&mut child, STOP_TIMEOUT)
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(mut self) -> Result<ExitStatus, Box<dyn Error + Send + Sync>> {
        let mut child = self.child.take().ok_or_else(|| fail("already stopped"))?;
        wait_bounded(&mut child, STOP_TIMEOUT)
    }
}

/// Sends SIGTERM, SIGINT or SIGKILL to a process.
pub fn signal(pid: u32, signal: Signal) -> TestResult {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| fail(format!("bad pid {pid}")))?;
    let signal = match signal {
        Signal::Term => rustix::process::Signal::TERM,
        Signal::Interrupt => rustix::process::Signal::INT,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    rustix::process::kill_process(pid, signal)?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Term,
    Interrupt,
    Kill,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- server log ({}) ---\n{}", self.base, self.log());
        }
    }
}

// ------------------------------------------------------------------ HTTP

/// A JSON HTTP client for one key.
pub struct Api {
    pub base: String,
    pub key: Option<String>,
    client: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Api {
    pub fn new(server: &Server, key: Option<&str>) -> Self {
        Api {
            base: server.base.clone(),
            key: key.map(str::to_owned),
            client: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("HTTP client"),
        }
    }

    pub fn with_client(base: &str, key: Option<&str>, client: reqwest::Client) -> Self {
        Api {
            base: base.to_owned(),
            key: key.map(str::to_owned),
            client,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send(request: reqwest::RequestBuilder) -> Result<Reply, Box<dyn Error + Send + Sync>> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    }

    pub async fn get(&self, path: &str) -> Result<Reply, Box<dyn Error + Send + Sync>> {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Reply, Box<dyn Error + Send + Sync>> {
        Self::send(
            self.request(reqwest::Method::POST, path)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// `POST /operations`, expecting 200.
    pub async fn push(
        &self,
        device: &str,
        ops: &[Value],
    ) -> Result<Value, Box<dyn Error + Send + Sync>> {
        let reply = self
            .post_raw(
                "/operations",
                json!({ "device_id": device, "operations": ops }).to_string(),
            )
            .await?;
        expect_status(&reply, 200)?;
        Ok(reply.body)
    }

    /// `GET /operations?device=&since=[&limit=]`, expecting 200.
    pub async fn fetch(
        &self,
        device: &str,
        since: u64,
        limit: Option<u64>,
    ) -> Result<Value, Box<dyn Error + Send + Sync>> {
        let mut path = format!("/operations?device={device}&since={since}");
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        let reply = self.get(&path).await?;
        expect_status(&reply, 200)?;
        Ok(reply.body)
    }

    pub async fn version(&self) -> Result<u64, Box<dyn Error + Send + Sync>> {
        let reply = self.get("/version?device=probe").await?;
        expect_status(&reply, 200)?;
        reply.body["version"]
            .as_u64()
            .ok_or_else(|| fail("no version"))
    }
}

pub fn expect_status(reply: &Reply, status: u16) -> TestResult {
    if reply.status == status {
        Ok(())
    } else {
        Err(fail(format!(
            "expected HTTP {status}, got {}: {}",
            reply.status, reply.body
        )))
    }
}

/// An operation as the old Lua client builds it.
pub fn op(id: &str, kind: &str, story: &str, title: Option<&str>) -> Value {
    let mut op = json!({
        "id": id,
        "type": kind,
        "story_id": story,
        "timestamp": 1_700_000_000,
        "metadata": {},
    });
    if let Some(title) = title {
        op["data"] = json!({ "title": title, "passages": [{ "name": "start", "text": "…" }] });
    }
    op
}

/// Ids of fetched operations, in order.
pub fn ids(fetched: &Value) -> Vec<String> {
    fetched["operations"]
        .as_array()
        .map(|ops| {
            ops.iter()
                .filter_map(|op| op["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// --------------------------------------------------------------- WebSocket

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Ws {
    stream: WsStream,
}

impl Ws {
    pub async fn connect(url: &str) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let (stream, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await??;
        Ok(Ws { stream })
    }

    /// Connects and authenticates, expecting `auth_ok`.
    pub async fn authenticated(
        url: &str,
        key: &str,
        device: Option<&str>,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let mut ws = Ws::connect(url).await?;
        let mut auth = json!({ "type": "auth", "api_key": key });
        if let Some(device) = device {
            auth["device_id"] = json!(device);
        }
        ws.send(auth).await?;
        let reply = ws.recv().await?;
        if reply["type"] != "auth_ok" {
            return Err(fail(format!("expected auth_ok, got {reply}")));
        }
        Ok(ws)
    }

    pub async fn send(&mut self, message: Value) -> TestResult {
        self.stream.send(Message::text(message.to_string())).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, message: Message) -> TestResult {
        self.stream.send(message).await?;
        Ok(())
    }

    /// The next JSON message within [`WAIT`] (control frames skipped).
    pub async fn recv(&mut self) -> Result<Value, Box<dyn Error + Send + Sync>> {
        self.recv_within(WAIT)
            .await?
            .ok_or_else(|| fail("no WebSocket message within the time limit"))
    }

    /// The next JSON message, or `None` if nothing arrives within `limit`.
    pub async fn recv_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Value>, Box<dyn Error + Send + Sync>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Ok(None),
                Ok(next) => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => return Ok(Some(serde_json::from_str(&text)?)),
                Some(Ok(Message::Close(frame))) => {
                    return Err(fail(format!("socket closed: {frame:?}")));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(fail("socket ended")),
            }
        }
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn closed(&mut self) -> Result<Option<u16>, Box<dyn Error + Send + Sync>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Err(fail("socket still open")),
                Ok(Some(Ok(Message::Close(frame)))) => return Ok(frame.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return Ok(None),
            }
        }
    }

    /// Sends a request and waits for the answer carrying the same `request_id`
    /// (skipping `remote_change` and other unrelated messages).
    pub async fn request(&mut self, message: Value) -> Result<Value, Box<dyn Error + Send + Sync>> {
        let id = message["request_id"].clone();
        self.send(message).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self
                .recv_within(left)
                .await?
                .ok_or_else(|| fail("no answer within the time limit"))?;
            if reply["request_id"] == id && reply["type"] != "remote_change" {
                return Ok(reply);
            }
        }
    }
}

/// Runs an async test body on a fresh runtime.
pub fn block_on<F: std::future::Future<Output = TestResult>>(future: F) -> TestResult {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

/// A path inside the temporary directory of a database (for extra files).
pub fn file_in(db: &Database, name: &str) -> PathBuf {
    db.dir().join(name)
}

/// A small deterministic random number generator (xorshift).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Resident memory of a process, in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}
