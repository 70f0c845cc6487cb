//! Assets and compression against the real reference server on loopback:
//! chunked uploads and streamed downloads that resume after the connection
//! is cut (by a proxy written here), de-duplication, namespace isolation,
//! and negotiated gzip over HTTP and WebSocket. Every wait is bounded;
//! servers and files are removed when a test ends.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sync_core::protocol::{OpType, Operation};
use sync_core::transport::blob::{sha256_hex, BlobError};
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::transport::websocket::{WsClient, WsConfig};
use sync_core::value::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;

use support::{runtime, server_binary, Server, KEY};

/// Upload chunk used here: small, so a few MB make several chunks.
const CHUNK: usize = 512 * 1024;

fn transport(url: &str, key: &str, retries: u32) -> HttpTransport {
    let mut config = HttpConfig::new(url, key);
    config.timeout = Duration::from_secs(10);
    config.max_retries = retries;
    config.retry_delay = Duration::from_millis(20);
    HttpTransport::new(config).expect("http transport")
}

/// Text-like bytes that gzip shrinks a lot.
fn compressible(len: usize) -> Vec<u8> {
    let line = b"Chapter 7. The lantern flickered as Mira opened the cellar door.\n";
    line.iter().copied().cycle().take(len).collect()
}

/// Bytes that do not compress (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A TCP proxy to `upstream` that cuts its first `cuts` connections once
/// `budget` bytes have gone the chosen way (client→server when `upward`).
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    cuts: usize,
    budget: usize,
    upward: bool,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let url = format!("http://{}", listener.local_addr().expect("proxy address"));
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let limit = (n < cuts).then_some(budget);
            tokio::spawn(relay(client, upstream, limit, upward));
        }
    });
    (url, connections)
}

async fn relay(
    client: TcpStream,
    upstream: std::net::SocketAddr,
    limit: Option<usize>,
    upward: bool,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (up_limit, down_limit) = if upward { (limit, None) } else { (None, limit) };
    let up = pipe(&mut client_read, &mut server_write, up_limit);
    let down = pipe(&mut server_read, &mut client_write, down_limit);
    // Whichever way ends first (a cut, or a close) ends the connection.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn pipe<R, W>(from: &mut R, to: &mut W, limit: Option<usize>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buffer = vec![0; 16 * 1024];
    let mut passed = 0usize;
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let n = match limit {
            Some(limit) if passed + n >= limit => {
                let _ = to.write_all(&buffer[..limit - passed]).await;
                return;
            }
            _ => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
        passed += n;
    }
}

#[test]
fn upload_download_dedup_and_compressed_chunks() {
    let server = Server::start();
    let rt = runtime();
    let work = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let http = transport(&server.http_url(), KEY, 2);
        let blobs = http.blobs(CHUNK);

        // 6 MB of text: sent in gzip chunks once the server said it takes gzip.
        let text = compressible(6 * 1024 * 1024);
        let source = work.path().join("chapter.txt");
        std::fs::write(&source, &text).expect("write source");
        let report = blobs.upload_file(&source).await.expect("upload");
        assert_eq!(report.sha256, sha256_hex(&text));
        assert_eq!(report.size, text.len() as u64);
        assert!(!report.skipped);
        assert!(
            report.sent * 10 < report.size,
            "compressed chunks: {} bytes sent for {}",
            report.sent,
            report.size
        );
        let status = blobs.status(&report.sha256).await.expect("status");
        assert!(status.complete);

        // Downloaded whole, compressed on the wire, verified, renamed into place.
        let before = http.traffic().received;
        let dest = work.path().join("copy").join("chapter.txt");
        let got = blobs
            .download_to_file(&format!("sha256:{}", report.sha256), &dest)
            .await
            .expect("download");
        assert_eq!(std::fs::read(&dest).expect("read copy"), text);
        assert_eq!(got.resumed_from, 0);
        assert!(got.received * 10 < got.size, "{got:?}");
        assert!(http.traffic().received - before < got.size / 10);
        assert!(!work.path().join("copy/chapter.txt.part").exists());

        // Sending it again sends nothing.
        let again = blobs.upload_file(&source).await.expect("re-upload");
        assert!(again.skipped);
        assert_eq!(again.sent, 0);

        // Media that does not compress goes as it is; small and empty blobs work.
        let media = noise(3 * 1024 * 1024 + 17, 7);
        let report = blobs.upload_bytes(&media).await.expect("upload media");
        assert!(report.sent >= media.len() as u64, "{report:?}");
        let dest = work.path().join("media.bin");
        blobs
            .download_to_file(&report.sha256, &dest)
            .await
            .expect("download media");
        assert_eq!(std::fs::read(&dest).expect("read media"), media);
        for data in [&b""[..], b"x"] {
            let report = blobs.upload_bytes(data).await.expect("small upload");
            let dest = work.path().join(format!("small-{}", data.len()));
            blobs
                .download_to_file(&report.sha256, &dest)
                .await
                .expect("small download");
            assert_eq!(std::fs::read(&dest).expect("read small"), data);
        }

        let missing = sha256_hex(b"never uploaded");
        let err = blobs
            .download_to_file(&missing, &work.path().join("missing"))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::NotFound(_)), "{err}");
        assert!(blobs.status("not-a-hash").await.is_err());
    });
}

#[test]
fn namespaces_are_isolated_and_content_is_stored_once() {
    let server = Server::start();
    let other_key = "second-namespace-key";
    let status = Command::new(server_binary())
        .args(["keys", "add", "--key", other_key, "--db"])
        .arg(server.dir.path().join("sync.db"))
        .stdout(Stdio::null())
        .status()
        .expect("keys add");
    assert!(status.success());
    let rt = runtime();
    let work = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let mine = transport(&server.http_url(), KEY, 1).blobs(CHUNK);
        let theirs = transport(&server.http_url(), other_key, 1).blobs(CHUNK);
        let data = noise(1024 * 1024, 3);
        let sha = mine.upload_bytes(&data).await.expect("upload").sha256;

        // The other namespace cannot see or fetch it by its hash...
        let status = theirs.status(&sha).await.expect("status");
        assert!(!status.complete && status.received == 0, "{status:?}");
        let err = theirs
            .download_to_file(&sha, &work.path().join("stolen"))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::NotFound(_)), "{err}");

        // ...until it uploads the same bytes itself; they are stored once.
        let report = theirs.upload_bytes(&data).await.expect("upload again");
        assert!(!report.skipped && report.sent >= data.len() as u64);
        theirs
            .download_to_file(&sha, &work.path().join("theirs"))
            .await
            .expect("download own");
        let objects = server.dir.path().join("sync-blobs/objects");
        assert_eq!(count_files(&objects), 1);
        let uploads = server.dir.path().join("sync-blobs/uploads");
        assert_eq!(count_files(&uploads), 0, "no upload left behind");
    });
}

#[test]
fn interrupted_upload_resumes_where_the_server_stopped() {
    let server = Server::start();
    let rt = runtime();
    rt.block_on(async {
        let data = noise(5 * 1024 * 1024, 11);
        let sha = sha256_hex(&data);

        // Cut the connection 2.5 MB into the upload; no retries: the call fails.
        let (url, _) = cutting_proxy(server.addr, 1, 2_500_000, true).await;
        let failing = transport(&url, KEY, 0).blobs(4 * 1024 * 1024);
        let err = failing.upload_bytes(&data).await.unwrap_err();
        assert!(matches!(err, BlobError::GaveUp { .. }), "{err}");

        // The server kept what arrived of the cut chunk.
        let direct = transport(&server.http_url(), KEY, 2).blobs(4 * 1024 * 1024);
        let kept = direct.status(&sha).await.expect("status").received;
        assert!(kept > 1_000_000 && kept < 2_500_000, "kept {kept}");

        // The next call sends only the rest.
        let report = direct.upload_bytes(&data).await.expect("resume");
        assert_eq!(report.resumed_from, kept);
        assert_eq!(report.sent, data.len() as u64 - kept);
        assert!(direct.status(&sha).await.expect("status").complete);

        // Within one call, retries resume after each cut (three cuts here).
        let more = noise(3 * 1024 * 1024, 12);
        let (url, connections) = cutting_proxy(server.addr, 3, 700_000, true).await;
        let retrying = transport(&url, KEY, 5).blobs(CHUNK * 2);
        let report = retrying
            .upload_bytes(&more)
            .await
            .expect("upload with cuts");
        assert!(
            report.sent < more.len() as u64 + 3 * CHUNK as u64 * 2,
            "{report:?}"
        );
        assert!(connections.load(Ordering::SeqCst) > 3);
        let dir = tempfile::tempdir().expect("temp dir");
        direct
            .download_to_file(&report.sha256, &dir.path().join("more"))
            .await
            .expect("download");
        assert_eq!(std::fs::read(dir.path().join("more")).expect("read"), more);
    });
}

#[test]
fn interrupted_download_resumes_from_the_partial_file() {
    let server = Server::start();
    let rt = runtime();
    let work = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let data = noise(6 * 1024 * 1024, 21);
        let direct = transport(&server.http_url(), KEY, 2);
        let sha = direct
            .blobs(0)
            .upload_bytes(&data)
            .await
            .expect("upload")
            .sha256;

        let dest = work.path().join("asset.bin");
        let part = work.path().join("asset.bin.part");
        let (url, _) = cutting_proxy(server.addr, 1, 2_000_000, false).await;
        let failing = transport(&url, KEY, 0).blobs(0);
        let err = failing.download_to_file(&sha, &dest).await.unwrap_err();
        assert!(matches!(err, BlobError::GaveUp { .. }), "{err}");
        assert!(!dest.exists());
        let kept = std::fs::metadata(&part).expect("partial file").len();
        assert!(kept > 0 && kept < 2_000_000, "kept {kept}");

        // A later call asks only for the rest (Range) and checks the whole hash.
        let resumed = direct.blobs(0);
        let before = direct.traffic().received;
        let report = resumed.download_to_file(&sha, &dest).await.expect("resume");
        assert_eq!(report.resumed_from, kept);
        assert_eq!(report.received, data.len() as u64 - kept);
        assert!(direct.traffic().received - before < data.len() as u64 - kept + 4096);
        assert_eq!(std::fs::read(&dest).expect("read"), data);
        assert!(!part.exists());

        // A corrupt partial file is caught by the hash and removed.
        std::fs::write(&part, noise(1000, 99)).expect("corrupt part");
        let err = resumed
            .download_to_file(&sha, &work.path().join("asset.bin"))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::HashMismatch { .. }), "{err}");
        assert!(!part.exists());

        // Within one call, retries resume after each cut.
        let (url, _) = cutting_proxy(server.addr, 2, 1_500_000, false).await;
        let retrying = transport(&url, KEY, 4).blobs(0);
        let again = work.path().join("again.bin");
        let report = retrying
            .download_to_file(&sha, &again)
            .await
            .expect("download");
        assert!(
            report.received < data.len() as u64 + 1_000_000,
            "{report:?}"
        );
        assert_eq!(std::fs::read(&again).expect("read"), data);
    });
}

/// A story with `passages` passages of prose, as the engine pushes it.
fn story(passages: usize) -> Value {
    let passages = (0..passages)
        .map(|i| {
            Value::Object(Map::from([
                ("id".to_owned(), Value::Str(format!("p{i}"))),
                ("name".to_owned(), Value::Str(format!("Passage {i}"))),
                (
                    "text".to_owned(),
                    Value::Str(format!(
                        "The corridor bends left. A draught carries the smell of rain. [[Go on->p{}]]",
                        i + 1
                    )),
                ),
            ]))
        })
        .collect();
    Value::Object(Map::from([
        ("title".to_owned(), Value::from("The Long Corridor")),
        ("passages".to_owned(), Value::Array(passages)),
    ]))
}

#[test]
fn json_is_compressed_both_ways_once_negotiated() {
    let server = Server::start();
    let rt = runtime();
    rt.block_on(async {
        let mut op = Operation::new(OpType::Create, "corridor", Some(story(300)));
        op.device_id = "laptop".to_owned();
        let raw = serde_json::to_vec(&[&op]).expect("json").len() as u64;

        // HTTP: the first answer teaches the client that gzip bodies are welcome.
        let laptop = transport(&server.http_url(), KEY, 1);
        laptop.server_version("laptop").await.expect("version");
        let before = laptop.traffic().sent;
        laptop
            .push_operations("laptop", std::slice::from_ref(&op))
            .await
            .expect("push");
        let pushed = laptop.traffic().sent - before;
        assert!(pushed * 5 < raw, "push of {raw} JSON bytes sent {pushed}");
        let desktop = transport(&server.http_url(), KEY, 1);
        let fetched = desktop
            .fetch_operations("desktop", 0, None)
            .await
            .expect("fetch");
        assert_eq!(fetched.operations[0].data, op.data);
        assert!(desktop.traffic().received * 5 < raw);

        // WebSocket: gzip offered in auth, large messages go as compressed frames.
        let mut config = WsConfig::new(server.ws_url(), KEY);
        config.device_id = Some("phone".to_owned());
        let phone = WsClient::connect(config).await.expect("connect");
        let fetched = phone
            .fetch_operations("phone", 0, None)
            .await
            .expect("ws fetch");
        assert_eq!(fetched.operations[0].data, op.data);
        assert!(phone.traffic().received * 5 < raw, "{:?}", phone.traffic());
        let mut edit = op.clone();
        edit.id = "edit-1".to_owned();
        edit.op_type = OpType::Update;
        let before = phone.traffic().sent;
        let answer = phone
            .push_operations("phone", &[edit])
            .await
            .expect("ws push");
        assert!(answer.success);
        assert!((phone.traffic().sent - before) * 5 < raw);
        phone.close();

        // Switched off: the old text frames, full size.
        let mut config = WsConfig::new(server.ws_url(), KEY);
        config.compression = false;
        let plain = WsClient::connect(config).await.expect("connect");
        plain
            .fetch_operations("tablet", 0, None)
            .await
            .expect("plain fetch");
        assert!(plain.traffic().received >= raw, "{:?}", plain.traffic());
        plain.close();
    });
}
