//! Shared by the integration tests: the reference server as a child process
//! on loopback, with its own database in a temporary directory.
//!
//! Its binary is `WHISKER_SYNC_SERVER`, else `whisker-sync-server` beside
//! this test's target directory (`cargo build -p sync-server` makes it).

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub mod proxy;
pub mod reliability;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

/// The API key every server started here accepts.
pub const KEY: &str = "transport-test-key";
/// How long a server gets to start.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WHISKER_SYNC_SERVER") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> → target/<profile>/whisker-sync-server
    let exe = std::env::current_exe().expect("test executable path");
    let candidates = [
        exe.parent()
            .and_then(|deps| deps.parent())
            .map(|p| p.join("whisker-sync-server")),
        Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/debug/whisker-sync-server"),
        ),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .expect("whisker-sync-server not built: run `cargo build -p sync-server` (or set WHISKER_SYNC_SERVER)")
}

/// A reference server process with its own database.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server started through `sh -c '<shell>; exec server …'`.
    pub fn start_under_shell(shell: &str) -> Server {
        let dir = Server::new_database();
        Server::serve_under_shell(dir, "127.0.0.1:0", &[], shell)
    }

    /// A temporary directory with a database that accepts [`KEY`].
    fn new_database() -> TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new(server_binary())
            .args(["keys", "add", "--key", KEY, "--db"])
            .arg(dir.path().join("sync.db"))
            .stdout(Stdio::null())
            .status()
            .expect("run whisker-sync-server keys add");
        assert!(status.success(), "keys add failed");
        dir
    }

    /// A server with extra `serve` arguments (paths relative to its directory).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::serve_with(Server::new_database(), "127.0.0.1:0", extra)
    }

    pub fn serve(dir: TempDir, listen: &str) -> Server {
        Server::serve_with(dir, listen, &[])
    }

    pub fn serve_with(dir: TempDir, listen: &str, extra: &[&str]) -> Server {
        Server::serve_command(Command::new(server_binary()), dir, listen, extra)
    }

    /// Like [`Server::serve_with`], through `sh -c '<shell>; exec server …'`:
    /// the shell sets up the process (signal dispositions, limits) first.
    pub fn serve_under_shell(dir: TempDir, listen: &str, extra: &[&str], shell: &str) -> Server {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{shell}; exec \"$0\" \"$@\""))
            .arg(server_binary());
        Server::serve_command(command, dir, listen, extra)
    }

    /// Starts `command` (the server binary, or something that execs it) with
    /// the `serve` arguments; its log goes to `server.log` in `dir`.
    fn serve_command(mut command: Command, dir: TempDir, listen: &str, extra: &[&str]) -> Server {
        let log = std::fs::File::create(dir.path().join("server.log")).expect("server log");
        let mut child = command
            .current_dir(dir.path())
            .args(["serve", "--listen", listen, "--db"])
            .arg(dir.path().join("sync.db"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start whisker-sync-server");
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start within {WAIT:?}");
            }
        };
        let addr = line
            .trim()
            .rsplit("//")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected server banner {line:?}"));
        Server { child, addr, dir }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The server's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Sends SIGKILL (the process is reaped by [`Server::stop`] or drop).
    pub fn kill9(&self) {
        kill9(self.child.id());
    }

    /// A counter or gauge from the server's `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let mut stream = TcpStream::connect(self.addr).expect("connect to metrics");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    pub fn stop(mut self) -> (TempDir, SocketAddr) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let addr = self.addr;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        (dir, addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILL to a process this test started.
pub fn kill9(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .expect("a child's pid");
    // The process may already be gone; that is what was wanted.
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

impl Server {
    /// Registers another API key (another namespace) on the running server.
    pub fn add_key(&self, key: &str) {
        let status = Command::new(server_binary())
            .args(["keys", "add", "--key", key, "--db"])
            .arg(self.dir.path().join("sync.db"))
            .stdout(Stdio::null())
            .status()
            .expect("run whisker-sync-server keys add");
        assert!(status.success(), "keys add failed");
    }
}
