//! The HTTP and WebSocket clients against the real reference server on
//! loopback (its binary: `WHISKER_SYNC_SERVER`, else `whisker-sync-server`
//! beside this test's target directory; `cargo build -p sync-server` makes
//! it) and against a small fault server written here (500s, slowness,
//! oversized, malformed and gzip bodies). Every wait is bounded; servers
//! started here are killed and their files deleted when a test ends.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_core::protocol::{OpType, Operation};
use sync_core::transport::http::{HttpConfig, HttpError, HttpTransport};
use sync_core::transport::websocket::{WsClient, WsConfig, WsError, WsEvent};
use sync_core::value::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod support;

use support::{runtime, Server, KEY, WAIT};

fn op(story: &str, device: &str) -> Operation {
    let mut op = Operation::new(OpType::Create, story, Some(Value::from("content")));
    op.device_id = device.to_owned();
    op
}

fn http(url: &str, key: &str) -> HttpTransport {
    let mut config = HttpConfig::new(url, key);
    config.timeout = Duration::from_secs(5);
    config.max_retries = 2;
    config.retry_delay = Duration::from_millis(20);
    HttpTransport::new(config).expect("http transport")
}

#[test]
fn http_round_trip_and_wrong_key() {
    let server = Server::start();
    let rt = runtime();
    rt.block_on(async {
        let a = http(&server.http_url(), KEY);
        let ops = [op("s1", "dev-a"), op("s2", "dev-a")];
        let pushed = a.push_operations("dev-a", &ops).await.expect("push");
        assert!(pushed.success);
        assert_eq!(pushed.version, 2);
        let fetched = a.fetch_operations("dev-b", 0, None).await.expect("fetch");
        assert_eq!(fetched.operations.len(), 2);
        assert_eq!(fetched.version, 2);
        let page = a.fetch_operations("dev-b", 0, Some(1)).await.expect("page");
        assert!(page.has_more);
        assert_eq!(a.server_version("dev-a").await.expect("version"), 2);
        assert!(a.traffic().sent > 0 && a.traffic().received > 0);

        let wrong = http(&server.http_url(), "not-the-key");
        let err = wrong.fetch_operations("dev-a", 0, None).await.unwrap_err();
        assert_eq!(err.to_string(), "server returned HTTP 401: invalid API key");
        assert!(
            !matches!(err, HttpError::GaveUp { .. }),
            "4xx is not retried"
        );
    });
}

#[test]
fn http_server_down_is_retried_then_named() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let rt = runtime();
    let err = rt
        .block_on(http(&format!("http://127.0.0.1:{port}"), KEY).fetch_operations("d", 0, None))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("connection refused to http://127.0.0.1:{port}/operations?device=d&since=0 (gave up after 3 attempts)")
    );
}

/// What the fault server answers to one request.
#[derive(Clone)]
enum Reply {
    Status(u16, &'static str, Vec<(&'static str, String)>),
    Slow(Duration),
    Body(Vec<u8>, Vec<(&'static str, String)>),
    Chunked(usize),
    /// Reads the request and closes the connection without an answer.
    Hangup,
}

/// A loopback HTTP server answering requests with `replies` in turn (the last
/// one repeats). Counts requests.
async fn fault_server(replies: Vec<Reply>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let reply = replies[n.min(replies.len() - 1)].clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = |status: u16, body: &[u8], headers: &[(&str, String)]| {
                    let mut head = format!(
                        "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n",
                        body.len()
                    );
                    for (name, value) in headers {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("\r\n");
                    let mut bytes = head.into_bytes();
                    bytes.extend_from_slice(body);
                    bytes
                };
                let bytes = match reply {
                    Reply::Status(status, body, headers) => {
                        response(status, body.as_bytes(), &headers)
                    }
                    Reply::Body(body, headers) => response(200, &body, &headers),
                    Reply::Slow(delay) => {
                        tokio::time::sleep(delay).await;
                        response(200, br#"{"operations":[],"version":0}"#, &[])
                    }
                    Reply::Chunked(size) => {
                        let mut bytes = b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                        let chunk = vec![b' '; 64 * 1024];
                        let mut left = size;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            bytes.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                            bytes.extend_from_slice(&chunk[..n]);
                            bytes.extend_from_slice(b"\r\n");
                            left -= n;
                        }
                        bytes.extend_from_slice(b"0\r\n\r\n");
                        bytes
                    }
                    Reply::Hangup => return,
                };
                let _ = socket.write_all(&bytes).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, count)
}

const EMPTY_FETCH: &str = r#"{"operations":[],"version":7}"#;

#[test]
fn http_5xx_and_429_are_retried_until_recovery() {
    let rt = runtime();
    rt.block_on(async {
        let (url, count) = fault_server(vec![
            Reply::Status(500, r#"{"error":"storage error"}"#, vec![]),
            Reply::Status(429, "", vec![("Retry-After", "1".into())]),
            Reply::Status(200, EMPTY_FETCH, vec![]),
        ])
        .await;
        let started = Instant::now();
        let fetched = http(&url, KEY)
            .fetch_operations("d", 0, None)
            .await
            .expect("recovers");
        assert_eq!(fetched.version, 7);
        assert_eq!(count.load(Ordering::SeqCst), 3);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "Retry-After honoured"
        );

        let (url, count) =
            fault_server(vec![Reply::Status(503, "down for maintenance", vec![])]).await;
        let err = http(&url, KEY)
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "server returned HTTP 503: down for maintenance (gave up after 3 attempts)"
        );
        assert_eq!(count.load(Ordering::SeqCst), 3);

        let (url, count) =
            fault_server(vec![Reply::Status(404, r#"{"error":"not found"}"#, vec![])]).await;
        let err = http(&url, KEY)
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "server returned HTTP 404: not found");
        assert_eq!(count.load(Ordering::SeqCst), 1, "4xx is never retried");
    });
}

#[test]
fn http_connections_closed_before_any_answer_are_tried_past_without_a_retry() {
    let rt = runtime();
    rt.block_on(async {
        // What kept-alive connections look like after a server restart.
        let (url, count) = fault_server(vec![
            Reply::Hangup,
            Reply::Hangup,
            Reply::Status(200, EMPTY_FETCH, vec![]),
        ])
        .await;
        let mut config = HttpConfig::new(url, KEY);
        config.max_retries = 0;
        let fetched = HttpTransport::new(config)
            .unwrap()
            .fetch_operations("d", 0, None)
            .await
            .expect("answered on the third connection");
        assert_eq!(fetched.version, 7);
        assert_eq!(count.load(Ordering::SeqCst), 3);

        // A server that always hangs up is still reported, after four such
        // connections and then the retries as configured.
        let (url, count) = fault_server(vec![Reply::Hangup]).await;
        let mut config = HttpConfig::new(url, KEY);
        config.max_retries = 1;
        config.retry_delay = Duration::from_millis(10);
        let err = HttpTransport::new(config)
            .unwrap()
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "failed: connection closed before message completed (gave up after 2 attempts)"
            ),
            "{err}"
        );
        assert_eq!(count.load(Ordering::SeqCst), 4 + 2);
    });
}

#[test]
fn http_timeout_is_per_attempt_and_named() {
    let rt = runtime();
    rt.block_on(async {
        let (url, count) = fault_server(vec![Reply::Slow(Duration::from_secs(3))]).await;
        let mut config = HttpConfig::new(url.clone(), KEY);
        config.timeout = Duration::from_millis(300);
        config.max_retries = 1;
        config.retry_delay = Duration::from_millis(10);
        let started = Instant::now();
        let err = HttpTransport::new(config)
            .unwrap()
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(
            err.to_string(),
            format!("timed out after 0.3s waiting for {url}/operations?device=d&since=0 (gave up after 2 attempts)")
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn http_rejects_oversized_and_malformed_bodies_and_reads_gzip() {
    let rt = runtime();
    rt.block_on(async {
        let limited = |url: &str| {
            let mut config = HttpConfig::new(url, KEY);
            config.max_response_bytes = 1024 * 1024;
            config.max_retries = 0;
            HttpTransport::new(config).unwrap()
        };
        let (url, _) = fault_server(vec![Reply::Body(vec![b' '; 2 * 1024 * 1024], vec![])]).await;
        let err = limited(&url)
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::TooLarge { .. }), "{err}");
        let (url, _) = fault_server(vec![Reply::Chunked(3 * 1024 * 1024)]).await;
        let err = limited(&url)
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than the 1048576-byte limit"),
            "{err}"
        );

        let (url, _) = fault_server(vec![Reply::Body(b"<html>oops</html>".to_vec(), vec![])]).await;
        let err = limited(&url)
            .fetch_operations("d", 0, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid JSON from server: "),
            "{err}"
        );

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(EMPTY_FETCH.as_bytes()).unwrap();
        let body = gz.finish().unwrap();
        let (url, _) = fault_server(vec![Reply::Body(
            body,
            vec![("Content-Encoding", "gzip".into())],
        )])
        .await;
        let fetched = limited(&url)
            .fetch_operations("d", 0, None)
            .await
            .expect("gzip body");
        assert_eq!(fetched.version, 7);
    });
}

fn ws_config(url: &str, device: &str) -> WsConfig {
    let mut config = WsConfig::new(url, KEY);
    config.device_id = Some(device.to_owned());
    config.ping_interval = Duration::from_millis(500);
    config.response_timeout = Duration::from_secs(2);
    config.max_reconnect_delay = Duration::from_secs(1);
    config
}

/// Waits for events until `done` says so; returns them all.
async fn events_until(client: &WsClient, mut done: impl FnMut(&[WsEvent]) -> bool) -> Vec<WsEvent> {
    let deadline = Instant::now() + WAIT;
    let mut events = Vec::new();
    while !done(&events) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting; got {events:?}"
        );
        if let Some(event) = client.next_event(Duration::from_millis(200)).await {
            events.push(event);
        }
    }
    events
}

fn remote_ids(events: &[WsEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            WsEvent::RemoteChange(op) => op.get("id").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[test]
fn websocket_requests_remote_changes_and_wrong_key() {
    let server = Server::start();
    let rt = runtime();
    rt.block_on(async {
        let wrong = WsClient::connect(WsConfig::new(server.ws_url(), "not-the-key")).await;
        assert!(matches!(&wrong, Err(WsError::AuthFailed(reason)) if reason == "invalid API key"));

        let a = WsClient::connect(ws_config(&server.ws_url(), "dev-a"))
            .await
            .expect("a");
        let b = WsClient::connect(ws_config(&server.ws_url(), "dev-b"))
            .await
            .expect("b");
        let pushed = a
            .push_operations("dev-a", &[op("s1", "dev-a")])
            .await
            .expect("push");
        assert!(pushed.success);
        let events = events_until(&b, |e| !remote_ids(e).is_empty()).await;
        assert_eq!(remote_ids(&events).len(), 1);
        let fetched = b.fetch_operations("dev-b", 0, None).await.expect("fetch");
        assert_eq!(fetched.operations.len(), 1);
        assert_eq!(b.server_version("dev-b").await.expect("version"), 1);
        // Answers are matched by request id, also when requests overlap.
        let (x, y) = tokio::join!(
            b.server_version("dev-b"),
            b.fetch_operations("dev-b", 0, None)
        );
        assert_eq!((x.unwrap(), y.unwrap().version), (1, 1));
    });
}

#[test]
fn websocket_reconnects_after_server_restart_without_missing_changes() {
    let server = Server::start();
    let rt = runtime();
    rt.block_on(async {
        let http_url = server.http_url();
        let b = WsClient::connect(ws_config(&server.ws_url(), "dev-b"))
            .await
            .expect("b");
        let pusher = http(&http_url, KEY);
        let first = op("before", "dev-a");
        pusher
            .push_operations("dev-a", std::slice::from_ref(&first))
            .await
            .unwrap();
        let events = events_until(&b, |e| remote_ids(e).len() == 1).await;
        assert_eq!(remote_ids(&events), vec![first.id.clone()]);

        // Restart on the same port and database; push while b is still away.
        let (dir, addr) = server.stop();
        let down = events_until(&b, |e| {
            e.iter().any(|e| matches!(e, WsEvent::Disconnected { .. }))
        })
        .await;
        assert!(!b.is_connected(), "{down:?}");
        let server = Server::serve(dir, &addr.to_string());
        let pusher = http(&server.http_url(), KEY);
        let during = op("during", "dev-a");
        pusher
            .push_operations("dev-a", std::slice::from_ref(&during))
            .await
            .unwrap();

        let events = events_until(&b, |e| {
            e.iter().any(|e| matches!(e, WsEvent::Connected)) && remote_ids(e).contains(&during.id)
        })
        .await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, WsEvent::Reconnecting { .. })),
            "{events:?}"
        );
        assert!(b.is_connected());

        let after = op("after", "dev-a");
        pusher
            .push_operations("dev-a", std::slice::from_ref(&after))
            .await
            .unwrap();
        let more = events_until(&b, |e| remote_ids(e).contains(&after.id)).await;
        let mut seen = remote_ids(&events);
        seen.extend(remote_ids(&more));
        assert_eq!(
            seen,
            vec![during.id.clone(), after.id.clone()],
            "each change exactly once"
        );
        drop(server);
    });
}

#[test]
fn tls_is_verified_against_the_ca_file() {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    let certs = tempfile::tempdir().expect("temp dir");
    let cert = certs.path().join("cert.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(
        certs.path().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let cert_arg = cert.to_string_lossy().into_owned();
    let key_arg = certs.path().join("key.pem").to_string_lossy().into_owned();
    let server = Server::start_with(&["--tls-cert", &cert_arg, "--tls-key", &key_arg]);
    let https = format!("https://{}", server.addr);
    let wss = format!("wss://{}/ws", server.addr);
    let rt = runtime();
    rt.block_on(async {
        let untrusted = http(&https, KEY).server_version("d").await.unwrap_err();
        assert!(untrusted.to_string().contains("certificate"), "{untrusted}");
        assert!(
            matches!(untrusted, HttpError::TlsHandshake { .. }),
            "not retried: {untrusted}"
        );

        let mut config = HttpConfig::new(https.clone(), KEY);
        config.ca_file = Some(cert.clone());
        let trusted = HttpTransport::new(config).unwrap();
        assert_eq!(trusted.server_version("d").await.expect("https"), 0);

        let err = WsClient::connect(WsConfig::new(wss.clone(), KEY))
            .await
            .err()
            .expect("untrusted wss");
        assert!(err.to_string().contains("certificate"), "{err}");
        let mut config = ws_config(&wss, "dev-a");
        config.ca_file = Some(cert.clone());
        let client = WsClient::connect(config).await.expect("wss with ca_file");
        assert_eq!(client.server_version("dev-a").await.expect("version"), 0);
    });
}
