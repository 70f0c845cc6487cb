//! Security: namespaces are closed to other keys on every route and on the
//! WebSocket; keys are stored hashed; no key reaches the log; TLS through a
//! private CA for both clients; size limits on requests and messages; an
//! unauthenticated WebSocket is closed. (`http::key_isolation` and
//! `websocket::authentication_rules` cover the basic cases.)

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sync_core::engine::{Engine, EngineConfig, HttpLink, MemoryStorage, MemoryStore, QuietHost};
use sync_core::protocol::ConflictStrategy;
use sync_core::state::StateManager;
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::transport::websocket::{WsClient, WsConfig};
use sync_core::value::Value as Doc;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    expect_status, fail, figure, ids, op, Api, Backend, Database, TestResult, Ws,
};

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef";

fn no_ops(reply: &Value) -> bool {
    reply["operations"].as_array().is_some_and(Vec::is_empty)
}

/// Everything one key can reach, tried with another key.
pub async fn isolation_on_every_route(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("alice", ALICE)?;
    db.add_key("bob", BOB)?;
    let server = db.start(&[])?;
    let url = server.ws_url("/ws");
    let alice = Api::new(&server, Some(ALICE));
    let bob = Api::new(&server, Some(BOB));
    let mut alice_socket = Ws::authenticated(&url, ALICE, Some("alice-phone")).await?;
    let mut bob_socket = Ws::authenticated(&url, BOB, Some("bob-phone")).await?;

    // Alice writes over HTTP and over the WebSocket.
    alice
        .push(
            "alice-laptop",
            &[op("a1", "create", "secret-story", Some("Alice's"))],
        )
        .await?;
    let pushed = alice_socket
        .request(
            json!({"type": "push_operations", "request_id": 1, "device_id": "alice-phone",
                        "operations": [op("a2", "create", "diary", Some("Alice's diary"))]}),
        )
        .await?;
    assert_eq!(pushed["success"], true);
    let mut tried = 0;

    // Bob reads every way there is: nothing of Alice's.
    for path in [
        "/operations?device=bob&since=0",
        "/operations?device=alice-laptop&since=0",
        "/operations?device=alice-phone&since=0&limit=1000",
        "/operations?since=0",
        "/operations?device=bob&since=1",
    ] {
        let reply = bob.get(path).await?;
        expect_status(&reply, 200)?;
        if !no_ops(&reply.body) || reply.body["version"] != 0 {
            return Err(fail(format!("{path} showed Bob {}", reply.body)));
        }
        tried += 1;
    }
    assert_eq!(bob.version().await?, 0);
    let answer = bob_socket
        .request(
            json!({"type": "sync_request", "request_id": 2, "device_id": "alice-phone",
                        "since_version": 0}),
        )
        .await?;
    assert!(no_ops(&answer) && answer["version"] == 0, "{answer}");
    // A second auth with Alice's key does not switch Bob's socket over.
    let second = bob_socket
        .request(json!({"type": "auth", "request_id": 3, "api_key": ALICE}))
        .await?;
    assert_eq!(second["type"], "error");
    let answer = bob_socket
        .request(
            json!({"type": "sync_request", "request_id": 4, "since_version": 0,
                        "api_key": ALICE}),
        )
        .await?;
    assert!(no_ops(&answer), "{answer}");
    // The key only counts in the Authorization header.
    for path in [
        format!("/operations?since=0&api_key={ALICE}"),
        format!("/version?key={ALICE}"),
    ] {
        let anonymous = Api::new(&server, None);
        expect_status(&anonymous.get(&path).await?, 401)?;
        tried += 1;
    }
    tried += 3;

    // Bob writes with Alice's ids and story ids: his own namespace only,
    // and no fan-out across.
    let pushed = bob
        .push(
            "bob-laptop",
            &[op("a1", "update", "secret-story", Some("Bob's"))],
        )
        .await?;
    assert_eq!(pushed["accepted"], json!([{"op_id": "a1", "version": 1}]));
    let mut stale = op("b2", "update", "diary", Some("Bob's diary"));
    stale["base_version"] = json!(2);
    let pushed = bob_socket
        .request(
            json!({"type": "push_operations", "request_id": 5, "device_id": "bob-phone",
                        "operations": [stale]}),
        )
        .await?;
    assert_eq!(pushed["success"], true, "Alice's version leaked: {pushed}");
    tried += 2;
    if let Some(leak) = alice_socket.recv_within(Duration::from_millis(300)).await? {
        return Err(fail(format!("Alice's socket got Bob's change: {leak}")));
    }
    if let Some(leak) = bob_socket.recv_within(Duration::from_millis(100)).await? {
        return Err(fail(format!("Bob's socket got Alice's change: {leak}")));
    }
    let alice_view = alice.fetch("alice-tablet", 0, None).await?;
    assert_eq!(ids(&alice_view), ["a1", "a2"]);
    assert_eq!(alice_view["operations"][0]["data"]["title"], "Alice's");
    let bob_view = bob.fetch("bob-tablet", 0, None).await?;
    assert_eq!(ids(&bob_view), ["a1", "b2"]);

    // The routes without a key tell nothing about anyone's data.
    for path in ["/health", "/metrics", "/", "/nope"] {
        let reply = Api::new(&server, None).get(path).await?;
        let text = reply.body.to_string();
        for secret in [ALICE, BOB, "secret-story", "diary", "alice", "bob"] {
            if text.contains(secret) {
                return Err(fail(format!("{path} shows {secret:?}")));
            }
        }
        tried += 1;
    }
    figure(&format!(
        "security isolation ({backend}): {tried} cross-namespace attempts over HTTP and WebSocket \
         (fetch by every parameter, version, socket fetch, second auth, key in the query, writes \
         with the other namespace's ids and versions, fan-out both ways, unauthenticated routes): \
         0 leaks"
    ));
    Ok(())
}

/// Only SHA-256 digests of keys are stored; `keys list` shows no key.
pub async fn keys_hashed_at_rest(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("alice", ALICE)?;
    let digest = Sha256::digest(ALICE.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let server = db.start(&[])?;
    Api::new(&server, Some(ALICE))
        .push("laptop", &[op("x", "create", "s", Some("t"))])
        .await?;
    drop(server);
    let listed = db.keys(&["list"])?;
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    if listed.contains(ALICE) || !listed.contains("alice") {
        return Err(fail(format!("keys list: {listed}")));
    }
    match db.postgres_url() {
        None => {
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(db.dir())?.flatten() {
                if entry.file_name().to_string_lossy().starts_with("sync.db") {
                    bytes.extend(std::fs::read(entry.path())?);
                }
            }
            let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            if contains(ALICE.as_bytes()) {
                return Err(fail("the SQLite files hold the key in plain text"));
            }
            if !contains(digest.as_slice()) {
                return Err(fail("the SQLite files do not hold the key's digest"));
            }
        }
        Some(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(connection);
            let rows = client
                .query(
                    "SELECT t::text, encode(key_hash, 'hex') FROM api_keys t",
                    &[],
                )
                .await?;
            let everything: Vec<String> = client
                .query(
                    "SELECT string_agg(t::text, ' ') FROM (SELECT * FROM operations) t",
                    &[],
                )
                .await?
                .into_iter()
                .filter_map(|row| row.get::<_, Option<String>>(0))
                .collect();
            drop(client);
            let _ = driver.await;
            let row = rows.first().ok_or_else(|| fail("no key row"))?;
            let (text, stored): (String, String) = (row.get(0), row.get(1));
            if text.contains(ALICE) || everything.iter().any(|t| t.contains(ALICE)) {
                return Err(fail("PostgreSQL holds the key in plain text"));
            }
            assert_eq!(stored, hex);
        }
    }
    figure(&format!(
        "security keys at rest ({backend}): the database holds SHA-256 digests only; plain key \
         found: 0 times; `keys list` shows names only"
    ));
    Ok(())
}

/// Story content pushed in the tests below; it must not reach the log.
const CONTENT: &str = "story-text-that-must-not-be-logged";

/// With `RUST_LOG=trace`, nothing the server logs contains a key, right or
/// wrong, or story content, over HTTP or WebSocket, also when requests fail.
pub async fn no_keys_in_logs(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("alice", ALICE)?;
    let wrong = "wrong-key-0123456789abcdef";
    let server = db.start_logging(&["--max-body-bytes", "4096"], "trace")?;
    let url = server.ws_url("/ws");
    let alice = Api::new(&server, Some(ALICE));
    alice
        .push("laptop", &[op("x", "create", "s", Some(CONTENT))])
        .await?;
    alice.fetch("phone", 0, None).await?;
    alice.version().await?;
    expect_status(&alice.post_raw("/operations", "x".repeat(8192)).await?, 413)?;
    expect_status(&alice.post_raw("/operations", "{bad json").await?, 400)?;
    let intruder = Api::new(&server, Some(wrong));
    expect_status(&intruder.get("/version").await?, 401)?;
    let mut socket = Ws::authenticated(&url, ALICE, Some("phone")).await?;
    socket
        .request(json!({"type": "sync_request", "request_id": 1, "since_version": 0}))
        .await?;
    socket
        .request(
            json!({"type": "push_operations", "request_id": 2, "device_id": "phone",
                        "operations": [op("y", "update", "s", Some(CONTENT))]}),
        )
        .await?;
    socket.send_raw(Message::Close(None)).await?;
    let mut refused = Ws::connect(&url).await?;
    refused
        .send(json!({"type": "auth", "api_key": wrong}))
        .await?;
    refused.recv().await?;
    // Clients reading the answers see no key either.
    let mut config = HttpConfig::new(server.base.clone(), wrong);
    config.max_retries = 0;
    let error = HttpTransport::new(config)?
        .fetch_operations("d", 0, None)
        .await
        .err()
        .ok_or_else(|| fail("a wrong key was accepted"))?
        .to_string();
    let ws_error = match WsClient::connect(WsConfig::new(url.clone(), wrong)).await {
        Ok(_) => return Err(fail("a wrong key was accepted over WebSocket")),
        Err(e) => e.to_string(),
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log();
    let lines = log.lines().count();
    if lines < 5 {
        return Err(fail(format!("a trace log of only {lines} lines:\n{log}")));
    }
    for key in [ALICE, wrong, CONTENT] {
        for (what, text) in [
            ("server log", &log),
            ("HTTP error", &error),
            ("WebSocket error", &ws_error),
        ] {
            if let Some(line) = text.lines().find(|line| line.contains(key)) {
                return Err(fail(format!("the {what} contains a secret: {line}")));
            }
        }
    }
    figure(&format!(
        "security logs ({backend}): {lines} lines of RUST_LOG=trace server log over good, wrong and \
         missing keys, HTTP and WebSocket pushes and fetches, 400/401/413 answers, plus client \
         errors (\"{error}\", \"{ws_error}\"): keys or story content found: 0"
    ));
    Ok(())
}

/// A CA and a server certificate it signed, as PEM files in `dir`:
/// `(ca, chain, key)`.
fn private_ca(
    dir: &std::path::Path,
    name: &str,
) -> Result<(String, String, String), Box<dyn std::error::Error + Send + Sync>> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&leaf_key, &ca)?;
    let path = |file: &str| dir.join(format!("{name}-{file}")).display().to_string();
    std::fs::write(path("ca.pem"), ca.pem())?;
    std::fs::write(path("chain.pem"), format!("{}{}", leaf.pem(), ca.pem()))?;
    std::fs::write(path("key.pem"), leaf_key.serialize_pem())?;
    Ok((path("ca.pem"), path("chain.pem"), path("key.pem")))
}

/// TLS with a certificate from a private CA: the native HTTP and WebSocket
/// clients trust it through `ca_file` only, and two engines sync over it.
pub async fn tls_with_a_private_ca(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("alice", ALICE)?;
    let (ca, chain, key) = private_ca(db.dir(), "ours")?;
    let (other_ca, _, _) = private_ca(db.dir(), "theirs")?;
    let server = db.start(&["--tls-cert", &chain, "--tls-key", &key])?;
    let https = server.base.clone();
    let wss = server.ws_url("/ws");
    assert!(https.starts_with("https://"), "{https}");
    let config = |ca_file: Option<&str>| {
        let mut config = HttpConfig::new(https.clone(), ALICE);
        config.ca_file = ca_file.map(Into::into);
        config.max_retries = 0;
        config
    };
    for (what, ca_file) in [
        ("no CA file", None),
        ("another CA", Some(other_ca.as_str())),
    ] {
        let error = HttpTransport::new(config(ca_file))?
            .server_version("d")
            .await
            .err()
            .ok_or_else(|| fail(format!("{what}: an untrusted certificate was accepted")))?
            .to_string();
        if !error.contains("certificate") || error.contains("gave up") {
            return Err(fail(format!("{what}: {error}")));
        }
        let mut ws = WsConfig::new(wss.clone(), ALICE);
        ws.ca_file = ca_file.map(Into::into);
        if WsClient::connect(ws).await.is_ok() {
            return Err(fail(format!(
                "{what}: wss accepted an untrusted certificate"
            )));
        }
    }
    // Plain text to the TLS port gets nowhere.
    let plain = HttpTransport::new({
        let mut c = config(None);
        c.base_url = https.replacen("https", "http", 1);
        c
    })?;
    if plain.server_version("d").await.is_ok() {
        return Err(fail("plain HTTP was answered on the TLS port"));
    }

    // Trusted through the CA: a WebSocket client and two syncing engines.
    let mut ws = WsConfig::new(wss.clone(), ALICE);
    ws.ca_file = Some(ca.clone().into());
    ws.device_id = Some("listener".into());
    let listener = WsClient::connect(ws).await?;
    let ca_for_engines = ca.clone();
    let https_for_engines = https.clone();
    let synced = std::thread::spawn(move || -> Result<usize, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut devices = Vec::new();
        for name in ["laptop", "desktop"] {
            let mut config = HttpConfig::new(https_for_engines.clone(), ALICE);
            config.ca_file = Some(ca_for_engines.clone().into());
            let link = HttpLink::new(
                HttpTransport::new(config).map_err(|e| e.to_string())?,
                runtime.handle().clone(),
                100,
            );
            let engine = Engine::new(EngineConfig {
                device_id: name.to_owned(),
                strategy: ConflictStrategy::LastWriteWins,
                tracks_events: false,
            });
            let state = StateManager::open(MemoryStore::default()).map_err(|e| e.to_string())?;
            devices.push((engine, MemoryStorage::default(), state, link));
        }
        let story = Doc::Object(std::collections::BTreeMap::from([(
            "title".to_owned(),
            Doc::from("sent over TLS"),
        )]));
        devices[0].1.stories.insert("over-tls".into(), story);
        for _ in 0..2 {
            for (engine, storage, state, link) in &mut devices {
                engine
                    .sync(storage, Some(link), state, &mut QuietHost)
                    .map_err(|e| e.to_string())?;
            }
        }
        if devices[0].1.stories != devices[1].1.stories {
            return Err("the engines did not converge over TLS".into());
        }
        Ok(devices[1].1.stories.len())
    })
    .join()
    .map_err(|_| fail("the engines panicked"))?
    .map_err(fail)?;
    assert_eq!(synced, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(sync_core::transport::websocket::WsEvent::RemoteChange(_)) =
            listener.next_event(Duration::from_millis(200)).await
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(fail("no remote_change over wss"));
        }
    }
    assert_eq!(listener.server_version("listener").await?, 1);
    figure(
        "security TLS with a private CA: HTTPS and WSS trusted through ca_file only; no CA file, \
         another CA's file and plain HTTP all refused (not retried); two engines synced and a \
         WebSocket client received the change over TLS",
    );
    Ok(())
}

/// Requests and WebSocket messages over the limits are refused, store
/// nothing, and leave the server serving.
pub async fn size_limits(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("alice", ALICE)?;
    let server = db.start(&["--max-body-bytes", "65536", "--max-ops-per-push", "10"])?;
    let api = Api::new(&server, Some(ALICE));
    let url = server.ws_url("/ws");
    let big = op("big", "create", "big", Some(&"x".repeat(70_000)));
    let body = json!({"device_id": "d", "operations": [big.clone()]}).to_string();
    expect_status(&api.post_raw("/operations", body).await?, 413)?;
    let many: Vec<Value> = (0..11)
        .map(|i| op(&format!("m{i}"), "create", &format!("m{i}"), None))
        .collect();
    let body = json!({"device_id": "d", "operations": many.clone()}).to_string();
    expect_status(&api.post_raw("/operations", body).await?, 413)?;

    // An oversized header is refused before any handler runs.
    let huge_header = reqwest::Client::new()
        .get(format!("{}/version", server.base))
        .header("authorization", format!("Bearer {}", "k".repeat(100_000)))
        .send()
        .await;
    if let Ok(reply) = huge_header {
        if reply.status().is_success() || reply.status().is_server_error() {
            return Err(fail(format!("a 100 kB header got {}", reply.status())));
        }
    }

    // WebSocket: too many operations is an error answer; too big a message
    // closes the connection.
    let mut socket = Ws::authenticated(&url, ALICE, Some("d")).await?;
    let answer = socket
        .request(
            json!({"type": "push_operations", "request_id": 1, "device_id": "d",
                        "operations": many}),
        )
        .await?;
    assert_eq!(answer["type"], "error", "{answer}");
    socket
        .send(
            json!({"type": "push_operations", "request_id": 2, "device_id": "d",
                     "operations": [big]}),
        )
        .await?;
    socket.closed().await?;

    // Nothing was stored, and the server still serves.
    assert_eq!(api.version().await?, 0);
    let mut again = Ws::authenticated(&url, ALICE, Some("d")).await?;
    let answer = again
        .request(json!({"type": "ping", "request_id": 3}))
        .await?;
    assert_eq!(answer["type"], "pong");
    figure(&format!(
        "security size limits ({backend}): 70 kB body over a 64 KiB limit → 413, 11 operations over \
         a limit of 10 → 413 (HTTP) and an error answer (WebSocket), a 100 kB header refused, a \
         70 kB WebSocket message → connection closed; stored: 0; server kept serving"
    ));
    Ok(())
}

/// A WebSocket that does not authenticate first is closed: binary frames,
/// garbage, an auth without a key, and one kept busy with pings.
pub async fn unauthenticated_websockets_are_closed(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("alice", ALICE)?;
    let server = db.start(&["--ws-auth-timeout", "1s"])?;
    let url = server.ws_url("/ws");
    let openers = [
        Message::binary(ALICE.as_bytes().to_vec()),
        Message::text("not json"),
        Message::text(json!({"type": "auth"}).to_string()),
        Message::text(json!({"type": "auth", "api_key": 42}).to_string()),
        Message::text(json!({"type": "ping", "request_id": 1}).to_string()),
        Message::text(
            json!({"type": "push_operations", "device_id": "d",
                             "operations": [op("x", "create", "s", None)]})
            .to_string(),
        ),
    ];
    let count = openers.len();
    for opener in openers {
        let mut ws = Ws::connect(&url).await?;
        ws.send_raw(opener).await?;
        let reply = ws.recv().await?;
        if reply["type"] != "auth_failed" {
            return Err(fail(format!("expected auth_failed, got {reply}")));
        }
        if ws.closed().await? != Some(1008) {
            return Err(fail("not closed with 1008"));
        }
    }
    // Pings do not keep an unauthenticated socket open past the auth timeout.
    let started = Instant::now();
    let mut pinger = Ws::connect(&url).await?;
    let closed = loop {
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
        if pinger
            .send_raw(Message::Ping(Vec::new().into()))
            .await
            .is_err()
        {
            break true;
        }
        match pinger.recv_within(Duration::from_millis(200)).await {
            Ok(Some(reply)) if reply["type"] == "auth_failed" => break true,
            Ok(_) => {}
            Err(_) => break true,
        }
    };
    if !closed {
        return Err(fail("a pinging socket stayed open without auth"));
    }
    assert_eq!(Api::new(&server, Some(ALICE)).version().await?, 0);
    figure(&format!(
        "security unauthenticated WebSockets ({backend}): {count} kinds of first message (binary, \
         garbage, auth without or with a non-string key, requests) answered auth_failed and closed \
         with 1008; a socket sending only pings closed at the auth timeout after {:.1}s; stored: 0",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
