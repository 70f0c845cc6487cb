//! Crash safety with real processes: a client syncing through a proxy to the
//! reference server is killed with SIGKILL, then restarted. Stories and sync
//! state live in files (written to a temporary file, then renamed), as a real
//! device's do.
//!
//! - Between push and acknowledgement: the proxy lets the server accept the
//!   push, then kills the client before it sees the answer.
//! - At random moments during syncs.
//!
//! After each kill the client syncs again. No edit may be lost and the server
//! must hold each edit once; a fresh device then receives exactly what the
//! killed client holds.
//!
//! The client is this test binary run again with `CRASH_CLIENT=<dir>`.
//! `WHISKER_CRASH_ITERATIONS` sets the kills per test (default: 12 between
//! push and acknowledgement, 25 at random moments; `make soak` runs more).

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use support::reliability::{env_count, figure};
use support::{runtime, Server, KEY};
use sync_core::engine::{
    Engine, EngineConfig, HostError, HttpLink, QuietHost, Storage, StoryEntry,
};
use sync_core::protocol::ConflictStrategy;
use sync_core::state::{StateManager, StateStore, StoreError};
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::value::Value;

/// Writes `bytes` to `path` atomically: a kill leaves the old or the new file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, bytes)?;
    std::fs::rename(temp, path)
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).expect("stored JSON"))
}

/// Sync state in files, one per key.
struct FileStore(PathBuf);

impl StateStore for FileStore {
    fn load(&mut self, key: &str) -> Result<Option<Value>, StoreError> {
        Ok(read_json(&self.0.join(format!("{key}.json"))))
    }

    fn save(&mut self, key: &str, value: &Value) -> Result<(), StoreError> {
        let json = serde_json::to_vec(value).map_err(|e| StoreError(e.to_string()))?;
        write_atomically(&self.0.join(format!("{key}.json")), &json)
            .map_err(|e| StoreError(e.to_string()))
    }

    fn can_delete(&self) -> bool {
        true
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        let _ = std::fs::remove_file(self.0.join(format!("{key}.json")));
        Ok(())
    }
}

/// Stories in files, one per story.
struct FileStories(PathBuf);

impl FileStories {
    fn all(&self) -> BTreeMap<String, Value> {
        let mut stories = BTreeMap::new();
        for entry in std::fs::read_dir(&self.0).expect("stories dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                stories.insert(id.to_owned(), read_json(&entry.path()).expect("story"));
            }
        }
        stories
    }
}

fn host_error(e: std::io::Error) -> HostError {
    HostError(e.to_string())
}

impl Storage for FileStories {
    fn list(&mut self) -> Result<Vec<StoryEntry>, HostError> {
        Ok(self
            .all()
            .into_keys()
            .map(|id| StoryEntry {
                id,
                updated_at: None,
                tags: None,
            })
            .collect())
    }

    fn load(&mut self, id: &str) -> Result<Option<Value>, HostError> {
        Ok(read_json(&self.0.join(format!("{id}.json"))))
    }

    fn save(&mut self, id: &str, story: &Value) -> Result<(), HostError> {
        let json = serde_json::to_vec(story).map_err(|e| HostError(e.to_string()))?;
        write_atomically(&self.0.join(format!("{id}.json")), &json).map_err(host_error)
    }

    fn delete(&mut self, id: &str) -> Result<(), HostError> {
        match std::fs::remove_file(self.0.join(format!("{id}.json"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(host_error(e)),
            _ => Ok(()),
        }
    }

    fn update_metadata(&mut self, _: &str, _: &Value) -> Result<bool, HostError> {
        Ok(false)
    }
}

/// A device's directories under `root`.
fn device_dirs(root: &Path) -> (PathBuf, PathBuf) {
    let (stories, state) = (root.join("stories"), root.join("state"));
    std::fs::create_dir_all(&stories).expect("stories dir");
    std::fs::create_dir_all(&state).expect("state dir");
    (stories, state)
}

/// One sync of the device in `root` against `url`.
fn sync_device(root: &Path, device: &str, url: &str) -> Result<(), String> {
    let (stories, state) = device_dirs(root);
    let runtime = runtime();
    let mut config = HttpConfig::new(url, KEY);
    config.timeout = Duration::from_secs(10);
    config.max_retries = 0;
    let mut link = HttpLink::new(
        HttpTransport::new(config).map_err(|e| e.to_string())?,
        runtime.handle().clone(),
        50,
    );
    let mut state = StateManager::open(FileStore(state)).map_err(|e| e.to_string())?;
    let mut engine = Engine::new(EngineConfig {
        device_id: device.to_owned(),
        strategy: ConflictStrategy::LastWriteWins,
        tracks_events: false,
    });
    engine
        .sync(
            &mut FileStories(stories),
            Some(&mut link),
            &mut state,
            &mut QuietHost,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The client process: `CRASH_CLIENT=<dir>`, `CRASH_URL`, `CRASH_DEVICE`.
#[test]
fn client_process() {
    let Ok(root) = std::env::var("CRASH_CLIENT") else {
        return;
    };
    let url = std::env::var("CRASH_URL").expect("CRASH_URL");
    let device = std::env::var("CRASH_DEVICE").expect("CRASH_DEVICE");
    if let Err(e) = sync_device(Path::new(&root), &device, &url) {
        eprintln!("sync failed: {e}");
        std::process::exit(3);
    }
}

fn spawn_client(root: &Path, url: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "client_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CRASH_CLIENT", root)
        .env("CRASH_URL", url)
        .env("CRASH_DEVICE", "crashing-device")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn client")
}

/// Reads one HTTP/1.1 message (head and Content-Length body) from `reader`.
fn read_message(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().ok()?;
        }
        head.extend_from_slice(line.as_bytes());
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    head.extend(body);
    Some(head)
}

/// Forwards HTTP between clients and `upstream`; while `armed`, a push the
/// server answered is reported on `pushed` and its answer never forwarded.
fn proxy(upstream: String, armed: Arc<AtomicBool>, pushed: Sender<()>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
    let address = format!("http://{}", listener.local_addr().expect("proxy address"));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (upstream, armed, pushed) = (upstream.clone(), armed.clone(), pushed.clone());
            std::thread::spawn(move || {
                let Ok(mut server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let mut from_client = BufReader::new(client.try_clone().expect("clone"));
                let mut from_server = BufReader::new(server.try_clone().expect("clone"));
                let mut client = client;
                while let Some(request) = read_message(&mut from_client) {
                    let is_push = request.starts_with(b"POST /operations");
                    if server.write_all(&request).is_err() {
                        return;
                    }
                    let Some(answer) = read_message(&mut from_server) else {
                        return;
                    };
                    if is_push && armed.swap(false, Ordering::SeqCst) {
                        let _ = pushed.send(());
                        // Hold the connection until the client is gone.
                        std::thread::sleep(Duration::from_secs(2));
                        return;
                    }
                    if client.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

fn edit(stories: &Path, id: &str, round: usize) {
    let story = format!(r#"{{"title":"{id}","round":{round}}}"#);
    write_atomically(&stories.join(format!("{id}.json")), story.as_bytes()).expect("edit");
}

/// Stories the server holds, as a fresh device receives them.
fn fresh_copy(server_url: &str, scratch: &Path) -> BTreeMap<String, Value> {
    let root = scratch.join(format!("fresh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    sync_device(&root, "fresh-device", server_url).expect("fresh sync");
    FileStories(root.join("stories")).all()
}

/// Kills per test: `WHISKER_CRASH_ITERATIONS`, else `default`.
fn iterations(default: u64) -> usize {
    usize::try_from(env_count("WHISKER_CRASH_ITERATIONS", default)).unwrap_or(usize::MAX)
}

#[test]
fn a_kill_between_push_and_acknowledgement_loses_and_duplicates_nothing() {
    if std::env::var("CRASH_CLIENT").is_ok() {
        return;
    }
    let server = Server::start();
    let armed = Arc::new(AtomicBool::new(false));
    let (pushed_tx, pushed_rx) = mpsc::channel();
    let via_proxy = proxy(server.addr.to_string(), armed.clone(), pushed_tx);
    let scratch = tempfile::tempdir().expect("scratch");
    let root = scratch.path().join("device");
    let (stories, _) = device_dirs(&root);
    let mut pushed_edits = 0u64;
    let rounds = iterations(12);
    for round in 1..=rounds {
        let changed = (round % 3) + 1;
        for i in 0..changed {
            edit(&stories, &format!("story-{i}"), round);
        }
        pushed_edits += changed as u64;
        armed.store(true, Ordering::SeqCst);
        let mut client = spawn_client(&root, &via_proxy);
        pushed_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the client pushed through the proxy");
        client.kill().expect("kill client");
        client.wait().expect("reap client");
        sync_device(&root, "crashing-device", &server.http_url()).expect("sync after the kill");
    }
    // Every edit was stored once: the restarted client re-pushed the very
    // operations the server had already accepted, which it recognised.
    assert_eq!(
        server.metric("whisker_sync_operations_accepted_total"),
        pushed_edits
    );
    assert_eq!(
        server.metric("whisker_sync_operations_duplicate_total"),
        pushed_edits
    );
    let local = FileStories(stories).all();
    assert_eq!(local.len(), 3);
    assert_eq!(fresh_copy(&server.http_url(), scratch.path()), local);
    figure(&format!(
        "crash client SIGKILL between push and acknowledgement: {rounds} kills, {pushed_edits} \
         edits, each stored once (re-pushes acknowledged as duplicates: {pushed_edits}); edits lost: 0"
    ));
}

#[test]
fn kills_at_random_moments_lose_nothing() {
    if std::env::var("CRASH_CLIENT").is_ok() {
        return;
    }
    let server = Server::start();
    let scratch = tempfile::tempdir().expect("scratch");
    let root = scratch.path().join("device");
    let (stories, _) = device_dirs(&root);
    // How long a whole client run takes, so kills spread over all of it.
    let started = std::time::Instant::now();
    let mut client = spawn_client(&root, &server.http_url());
    let status = client.wait().expect("reap client");
    assert!(status.success(), "an undisturbed client run failed");
    let span = u64::try_from(started.elapsed().as_millis()).unwrap_or(1000) * 5 / 4 + 1;
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    let rounds = iterations(25);
    let (mut killed, mut finished) = (0, 0);
    let mut edits = 0;
    for round in 1..=rounds {
        for i in 0..((round % 4) + 1) {
            edit(&stories, &format!("story-{}", (round + i) % 6), round);
            edits += 1;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % span);
        let mut client = spawn_client(&root, &server.http_url());
        std::thread::sleep(delay);
        let _ = client.kill();
        let status = client.wait().expect("reap client");
        if status.success() {
            finished += 1;
        } else {
            killed += 1;
        }
    }
    sync_device(&root, "crashing-device", &server.http_url()).expect("final sync");
    let local = FileStories(stories).all();
    assert_eq!(fresh_copy(&server.http_url(), scratch.path()), local);
    figure(&format!(
        "crash client SIGKILL at random moments (0-{span} ms into a run): {rounds} runs, {killed} \
         killed mid-run, {finished} finished first; {edits} edits, all on the server and a fresh \
         device after one more sync; edits lost: 0"
    ));
}
