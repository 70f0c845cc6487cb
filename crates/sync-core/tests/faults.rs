//! Fault injection with the real engine and the real server on loopback.
//!
//! Three devices share a namespace. Device A reaches the server through the
//! fault proxy (`support::proxy`), B and C directly. After a fault-free start,
//! A and B edit; A's next sync meets one fault: the server killed mid-push or
//! mid-pull, a connection reset, truncated or malformed JSON, an answer over
//! the size limit, a server that never answers, HTTP 401/403/429/500/503, a
//! WebSocket dropped in the middle of a message (both directions), a full
//! disk on the server. For each:
//!
//! - the sync fails with an error that names the cause (and never contains
//!   the API key);
//! - none of A's edits is lost and its pending queue still holds them;
//! - after the fault is gone (the server restarted where it was killed, the
//!   disk given room where it was full) the next syncs succeed and all three
//!   replicas hold the same stories, with every edit of A and B;
//! - the server holds each story once.
//!
//! Each scenario reports a line through `support::figure`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{prlimit, Pid, Resource, Rlimit};
use support::proxy::{Direction, Fault, Proxy, Route};
use support::reliability::figure;
use support::{runtime, Server, KEY};
use sync_core::engine::{
    with_content, ContentSource, Engine, EngineConfig, FetchPage, HostError, HttpLink,
    MemoryStorage, MemoryStore, PushReply, QuietHost, Transport,
};
use sync_core::protocol::{ConflictStrategy, Operation};
use sync_core::state::StateManager;
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::transport::websocket::{WsClient, WsConfig};
use sync_core::value::Value;
use tokio::runtime::{Handle, Runtime};

/// Largest answer device A accepts (the oversize fault sends more).
const RESPONSE_LIMIT: usize = 1024 * 1024;
/// Per-attempt timeout of device A (the hang fault waits this long, twice).
const TIMEOUT: Duration = Duration::from_secs(1);

/// The engine's transport over the native WebSocket client (as [`HttpLink`]
/// is over the HTTP client).
struct WsLink {
    client: Arc<WsClient>,
    runtime: Handle,
}

fn host_error(e: impl std::fmt::Display) -> HostError {
    HostError(e.to_string())
}

impl Transport for WsLink {
    fn fetch(
        &mut self,
        device_id: &str,
        since: u64,
        patches: bool,
    ) -> Result<FetchPage, HostError> {
        let page = self
            .runtime
            .block_on(self.client.fetch_page(device_id, since, Some(50), patches))
            .map_err(host_error)?;
        Ok(FetchPage {
            operations: page.operations.iter().map(Operation::to_value).collect(),
            version: page.version,
            has_more: page.has_more,
            bytes_received: 0,
            accepts_patches: page.features.iter().any(|f| f == sync_core::patch::PATCH),
        })
    }

    fn push(
        &mut self,
        device_id: &str,
        operations: &[Operation],
        content: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError> {
        let operations = with_content(operations, content)?;
        let answer = self
            .runtime
            .block_on(self.client.push_operations(device_id, &operations))
            .map_err(host_error)?;
        Ok(PushReply::from_response(answer, 0, 0))
    }
}

struct Device {
    name: String,
    engine: Engine,
    storage: MemoryStorage,
    state: StateManager<MemoryStore>,
    link: Box<dyn Transport>,
}

impl Device {
    fn new(name: &str, link: Box<dyn Transport>) -> Device {
        Device {
            name: name.to_owned(),
            engine: Engine::new(EngineConfig {
                device_id: name.to_owned(),
                strategy: ConflictStrategy::LastWriteWins,
                tracks_events: false,
            }),
            storage: MemoryStorage::default(),
            state: StateManager::open(MemoryStore::default()).expect("state"),
            link,
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        self.engine
            .sync(
                &mut self.storage,
                Some(self.link.as_mut()),
                &mut self.state,
                &mut QuietHost,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn must_sync(&mut self) {
        if let Err(e) = self.sync() {
            panic!("{} failed to sync: {e}", self.name);
        }
    }

    fn write(&mut self, story: &str, value: &str) {
        let mut fields = BTreeMap::new();
        fields.insert("title".to_owned(), Value::from(story));
        fields.insert("text".to_owned(), Value::from(value));
        self.storage
            .stories
            .insert(story.to_owned(), Value::Object(fields));
    }

    /// Story ids with a queued operation.
    fn pending_stories(&self) -> BTreeSet<String> {
        self.state
            .pending_operations()
            .into_iter()
            .map(|op| op.story_id)
            .collect()
    }
}

fn http_link(url: &str, runtime: &Runtime) -> Box<dyn Transport> {
    let mut config = HttpConfig::new(url, KEY);
    config.timeout = TIMEOUT;
    config.max_retries = 1;
    config.retry_delay = Duration::from_millis(20);
    config.max_response_bytes = RESPONSE_LIMIT;
    Box::new(HttpLink::new(
        HttpTransport::new(config).expect("transport"),
        runtime.handle().clone(),
        50,
    ))
}

fn ws_config(url: &str, device: &str) -> WsConfig {
    let mut config = WsConfig::new(url, KEY);
    config.device_id = Some(device.to_owned());
    config.response_timeout = Duration::from_secs(2);
    config.max_reconnect_delay = Duration::from_millis(200);
    config
}

/// How device A reaches the proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Http,
    WebSocket,
}

/// Three devices, A behind the proxy.
struct World {
    runtime: Runtime,
    server: Option<Server>,
    proxy: Proxy,
    a: Device,
    b: Device,
    c: Device,
    /// A's WebSocket client, to wait for its reconnection.
    a_ws: Option<Arc<WsClient>>,
    /// What every replica must hold once they converge.
    expected: BTreeMap<String, Value>,
    /// Stories A changed since everyone last converged.
    a_edits: BTreeSet<String>,
}

/// What brings the system back after the fault.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Nothing: the fault was one bad exchange.
    Nothing,
    /// The fault killed the server: start it again on its address and database.
    RestartServer,
}

impl World {
    /// Three devices that synced s1–s3 (A's) and t1 (B's).
    fn new(via: Via) -> World {
        World::with_server(via, Server::start())
    }

    fn with_server(via: Via, server: Server) -> World {
        let runtime = runtime();
        let proxy = Proxy::start(runtime.handle(), server.addr);
        let (link, a_ws): (Box<dyn Transport>, _) = match via {
            Via::Http => (http_link(&proxy.http_url(), &runtime), None),
            Via::WebSocket => {
                let client = runtime
                    .block_on(WsClient::connect(ws_config(&proxy.ws_url(), "device-a")))
                    .expect("WebSocket through the proxy");
                let client = Arc::new(client);
                let link = WsLink {
                    client: Arc::clone(&client),
                    runtime: runtime.handle().clone(),
                };
                (Box::new(link), Some(client))
            }
        };
        let a = Device::new("device-a", link);
        let b = Device::new("device-b", http_link(&server.http_url(), &runtime));
        let c = Device::new("device-c", http_link(&server.http_url(), &runtime));
        let mut world = World {
            runtime,
            server: Some(server),
            proxy,
            a,
            b,
            c,
            a_ws,
            expected: BTreeMap::new(),
            a_edits: BTreeSet::new(),
        };
        for story in ["s1", "s2", "s3"] {
            world.write_a(story, "a1");
        }
        world.write_b("t1", "b1");
        world.a.must_sync();
        world.b.must_sync();
        world.c.must_sync();
        world.a.must_sync();
        world.a_edits.clear();
        world
    }

    fn write_a(&mut self, story: &str, value: &str) {
        self.a.write(story, value);
        self.expected
            .insert(story.to_owned(), self.a.storage.stories[story].clone());
        self.a_edits.insert(story.to_owned());
    }

    fn delete_a(&mut self, story: &str) {
        self.a.storage.stories.remove(story);
        self.expected.remove(story);
        self.a_edits.insert(story.to_owned());
    }

    fn write_b(&mut self, story: &str, value: &str) {
        self.b.write(story, value);
        self.expected
            .insert(story.to_owned(), self.b.storage.stories[story].clone());
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("a running server")
    }

    fn server_pid(&self) -> u32 {
        self.server().child.id()
    }

    /// The server's version, asked directly.
    fn server_version(&self) -> u64 {
        let mut config = HttpConfig::new(self.server().http_url(), KEY);
        config.max_retries = 0;
        let transport = HttpTransport::new(config).expect("transport");
        self.runtime
            .block_on(transport.server_version("observer"))
            .expect("server version")
    }

    /// Starts the server again on its address and database.
    fn restart_server(&mut self) {
        let (dir, addr) = self.server.take().expect("a server").stop();
        self.server = Some(Server::serve(dir, &addr.to_string()));
    }

    /// A edits s1, creates s4 and deletes s2; B edits t1 and syncs it.
    fn edit(&mut self) {
        self.write_a("s1", "a2");
        self.write_a("s4", "a4");
        self.delete_a("s2");
        self.write_b("t1", "b2");
        self.b.must_sync();
    }

    /// A still holds its edits, and has them queued.
    fn check_edits_kept(&self, name: &str) {
        let pending = self.a.pending_stories();
        for id in &self.a_edits {
            assert_eq!(
                self.a.storage.stories.get(id),
                self.expected.get(id),
                "{name}: A's edit of {id} was lost"
            );
            assert!(
                pending.contains(id),
                "{name}: A's edit of {id} left the queue: {pending:?}"
            );
        }
    }

    /// Waits (bounded) until A's WebSocket client has reconnected.
    fn wait_for_reconnection(&self) {
        let Some(client) = &self.a_ws else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !client.is_connected() {
            assert!(Instant::now() < deadline, "A's WebSocket never reconnected");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everyone syncs twice; all replicas must hold the expected stories,
    /// with nothing left queued, and the server each story once.
    fn converge(&mut self, name: &str) {
        for _ in 0..2 {
            self.a.must_sync();
            self.b.must_sync();
            self.c.must_sync();
        }
        for device in [&self.a, &self.b, &self.c] {
            assert_eq!(
                device.storage.stories, self.expected,
                "{name}: {} did not converge",
                device.name
            );
            assert_eq!(
                device.state.pending_count(),
                0,
                "{name}: {} still has queued operations",
                device.name
            );
        }
        let mut config = HttpConfig::new(self.server().http_url(), KEY);
        config.max_retries = 0;
        let transport = HttpTransport::new(config).expect("transport");
        let snapshot = self
            .runtime
            .block_on(transport.fetch_operations("observer", 0, None))
            .expect("snapshot");
        let mut stories = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for op in &snapshot.operations {
            assert!(
                stories.insert(op.story_id.clone()),
                "{name}: the server holds {} twice",
                op.story_id
            );
            assert!(ids.insert(op.id.clone()), "{name}: operation stored twice");
        }
        for id in self.expected.keys() {
            assert!(stories.contains(id), "{name}: the server lacks {id}");
        }
        self.a_edits.clear();
    }
}

/// Runs one fault scenario: `arm` injects the fault, A's sync must fail with
/// an error containing every part of `expect`, lose nothing, and recover.
fn survive(name: &str, via: Via, arm: impl FnOnce(&World), expect: &[&str], recovery: Recovery) {
    survive_checked(name, via, arm, expect, recovery, |_, _| {});
}

/// [`survive`], with `check` called after the failed sync with the world and
/// the server's version before the fault.
fn survive_checked(
    name: &str,
    via: Via,
    arm: impl FnOnce(&World),
    expect: &[&str],
    recovery: Recovery,
    check: impl FnOnce(&World, u64),
) {
    let mut world = World::new(via);
    world.edit();
    let version_before = world.server_version();
    arm(&world);
    let started = Instant::now();
    let error = match world.a.sync() {
        Ok(()) => panic!("{name}: the sync succeeded despite the fault"),
        Err(e) => e,
    };
    let took = started.elapsed();
    for part in expect {
        assert!(
            error.contains(part),
            "{name}: the error {error:?} does not say {part:?}"
        );
    }
    assert!(!error.contains(KEY), "{name}: the error shows the key");
    assert_eq!(
        world.proxy.unused_faults(),
        0,
        "{name}: a fault was not used"
    );
    world.check_edits_kept(name);
    check(&world, version_before);
    let queued = world.a.pending_stories().len();
    if recovery == Recovery::RestartServer {
        world.restart_server();
    }
    world.wait_for_reconnection();
    world.converge(name);
    figure(&format!(
        "fault {name}: sync failed after {:.2}s with \"{error}\"; {queued} edited stories still queued; \
         next syncs converged 3 replicas; edits lost: 0",
        took.as_secs_f64()
    ));
}

#[test]
fn server_killed_mid_push_before_storing() {
    survive(
        "server killed mid-push (before storing)",
        Via::Http,
        |w| {
            let pid = w.server_pid();
            w.proxy
                .inject(Route::Push, Fault::Kill { pid, after: false }, 1);
        },
        &["/operations", "gave up after 2 attempts"],
        Recovery::RestartServer,
    );
}

#[test]
fn server_killed_mid_push_after_storing() {
    survive(
        "server killed mid-push (after storing, before answering)",
        Via::Http,
        |w| {
            let pid = w.server_pid();
            w.proxy
                .inject(Route::Push, Fault::Kill { pid, after: true }, 1);
        },
        &["/operations", "gave up after 2 attempts"],
        Recovery::RestartServer,
    );
}

#[test]
fn server_killed_mid_pull() {
    survive(
        "server killed mid-pull",
        Via::Http,
        |w| {
            let pid = w.server_pid();
            w.proxy
                .inject(Route::Fetch, Fault::Kill { pid, after: false }, 1);
        },
        &["/operations?device=device-a", "gave up after 2 attempts"],
        Recovery::RestartServer,
    );
}

#[test]
fn connection_reset() {
    survive(
        "connection reset on pull",
        Via::Http,
        |w| {
            w.proxy
                .inject(Route::Fetch, Fault::Reset { after: false }, 2)
        },
        &["/operations?device=device-a", "gave up after 2 attempts"],
        Recovery::Nothing,
    );
    survive(
        "connection reset on push (after storing)",
        Via::Http,
        |w| w.proxy.inject(Route::Push, Fault::Reset { after: true }, 2),
        &["/operations", "gave up after 2 attempts"],
        Recovery::Nothing,
    );
}

#[test]
fn truncated_answers() {
    survive(
        "truncated JSON on pull",
        Via::Http,
        |w| {
            let fault = Fault::Truncated {
                declared_full: false,
            };
            w.proxy.inject(Route::Fetch, fault, 1);
        },
        &["invalid JSON from server"],
        Recovery::Nothing,
    );
    survive(
        "push answer cut mid-body (after storing)",
        Via::Http,
        |w| {
            let fault = Fault::Truncated {
                declared_full: true,
            };
            w.proxy.inject(Route::Push, fault, 2);
        },
        &["/operations", "gave up after 2 attempts"],
        Recovery::Nothing,
    );
}

#[test]
fn malformed_answers() {
    survive(
        "HTML instead of JSON on pull",
        Via::Http,
        |w| {
            let body = b"<html><body>502 Bad Gateway</body></html>".to_vec();
            w.proxy.inject(Route::Fetch, Fault::Body(body), 1);
        },
        &["invalid JSON from server"],
        Recovery::Nothing,
    );
    survive(
        "wrongly shaped JSON on push (after storing)",
        Via::Http,
        |w| {
            let body = br#"{"success": "yes", "conflicts": 7}"#.to_vec();
            w.proxy.inject(Route::Push, Fault::Body(body), 1);
        },
        &["invalid JSON from server"],
        Recovery::Nothing,
    );
}

#[test]
fn answer_over_the_size_limit() {
    survive(
        "answer over the size limit",
        Via::Http,
        |w| {
            let body = vec![b' '; 2 * RESPONSE_LIMIT];
            w.proxy.inject(Route::Fetch, Fault::Body(body), 1);
        },
        &["larger than the 1048576-byte limit"],
        Recovery::Nothing,
    );
}

#[test]
fn server_that_never_answers() {
    survive(
        "server accepts and never answers",
        Via::Http,
        |w| w.proxy.inject(Route::Push, Fault::Hang, 2),
        &["timed out after 1s", "gave up after 2 attempts"],
        Recovery::Nothing,
    );
}

/// An error status the proxy answers with.
struct StatusCase {
    status: u16,
    body: &'static str,
    /// Requests it answers (2: the first attempt and the retry).
    times: usize,
    route: Route,
    /// Whether the server handled the request first.
    after: bool,
    expect: &'static [&'static str],
}

#[test]
fn error_statuses() {
    let cases = [
        StatusCase {
            status: 401,
            body: r#"{"error":"invalid API key"}"#,
            times: 1,
            route: Route::Fetch,
            after: false,
            expect: &["server returned HTTP 401: invalid API key"],
        },
        StatusCase {
            status: 403,
            body: r#"{"error":"forbidden"}"#,
            times: 1,
            route: Route::Push,
            after: false,
            expect: &["server returned HTTP 403: forbidden"],
        },
        StatusCase {
            status: 429,
            body: r#"{"error":"slow down"}"#,
            times: 2,
            route: Route::Push,
            after: false,
            expect: &["HTTP 429: slow down", "gave up after 2 attempts"],
        },
        StatusCase {
            status: 500,
            body: r#"{"error":"storage error"}"#,
            times: 2,
            route: Route::Push,
            after: true,
            expect: &["HTTP 500: storage error", "gave up after 2 attempts"],
        },
        StatusCase {
            status: 503,
            body: "down for maintenance",
            times: 2,
            route: Route::Fetch,
            after: false,
            expect: &["HTTP 503: down for maintenance", "gave up after 2 attempts"],
        },
    ];
    for case in cases {
        let fault = if case.after {
            Fault::StatusAfter(case.status, case.body)
        } else {
            Fault::Status(case.status, case.body)
        };
        let name = format!("HTTP {} on {:?}", case.status, case.route);
        survive(
            &name,
            Via::Http,
            |w| w.proxy.inject(case.route, fault, case.times),
            case.expect,
            Recovery::Nothing,
        );
    }
}

#[test]
fn transient_errors_are_retried_within_one_sync() {
    let mut world = World::new(Via::Http);
    world.edit();
    world.proxy.inject(Route::Fetch, Fault::Status(503, ""), 1);
    world
        .proxy
        .inject(Route::Push, Fault::Reset { after: true }, 1);
    world.a.must_sync();
    assert_eq!(world.proxy.applied(), 2);
    world.converge("transient errors");
    figure("fault transient 503 + reset (one attempt each): retried within the same sync, which succeeded; edits lost: 0");
}

#[test]
fn websocket_dropped_mid_message() {
    survive(
        "WebSocket dropped mid-message (server to client, during pull)",
        Via::WebSocket,
        |w| w.proxy.cut_websocket(Direction::ToClient, 0, 40),
        &["connection"],
        Recovery::Nothing,
    );
    survive_checked(
        "WebSocket dropped mid-message (client to server, during push)",
        Via::WebSocket,
        // The first message A sends is its pull; the second, its push.
        |w| w.proxy.cut_websocket(Direction::ToServer, 1, 20),
        &["connection"],
        Recovery::Nothing,
        |w, before| {
            assert_eq!(w.server_version(), before, "a cut push was stored");
        },
    );
}

/// Sets the largest file the server may write (`None`: no limit).
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let limit = Rlimit {
        current: bytes,
        maximum: None,
    };
    prlimit(pid, Resource::Fsize, limit).expect("prlimit on the server");
}

/// The largest file in `dir` (the SQLite database and its write-ahead log).
fn largest_file(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("server directory")
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .map(|meta| meta.len())
        .max()
        .unwrap_or(0)
}

/// A full disk on the server: the server process may not grow any file past
/// its current size (RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail
/// with EFBIG instead of killing it — what SQLite sees on a full disk), then
/// gets room again without a restart.
#[test]
fn server_disk_full() {
    let name = "full disk on the server (SQLite)";
    let server = Server::start_under_shell("trap '' XFSZ");
    let mut world = World::with_server(Via::Http, server);
    world.edit();
    let big = "x".repeat(64 * 1024);
    for i in 0..8 {
        world.write_a(&format!("big-{i}"), &big);
    }
    let pid = world.server_pid();
    let room = largest_file(world.server().dir.path()) + 16 * 1024;
    limit_file_size(pid, Some(room));
    let error = match world.a.sync() {
        Ok(()) => panic!("{name}: the push fit"),
        Err(e) => e,
    };
    assert!(
        error.contains("server returned HTTP 500: storage error"),
        "{name}: {error}"
    );
    assert!(!error.contains(KEY));
    world.check_edits_kept(name);
    let queued = world.a.pending_stories().len();
    let log = world.server().log();
    let cause = log
        .lines()
        .find(|line| line.contains("storage failure"))
        .unwrap_or_else(|| panic!("{name}: the server did not log the failure:\n{log}"))
        .to_owned();
    assert!(!log.contains(KEY), "{name}: the server log shows the key");
    // Room again: the same server process recovers.
    limit_file_size(pid, None);
    world.converge(name);
    // And what it stored survives a restart.
    world.restart_server();
    world.converge(name);
    figure(&format!(
        "fault {name}: push refused with \"{error}\" (server log: {}); {queued} edited stories \
         still queued; with room again the same server process took the next sync, 3 replicas \
         converged, and the data survived a restart; edits lost: 0",
        cause.trim()
    ));
}
