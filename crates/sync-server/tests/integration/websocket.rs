//! The WebSocket endpoint: handshake, requests, fan-out.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{fail, ids, op, Api, Backend, Database, Server, TestResult, Ws};

const KEY: &str = "ws-key-0123456789";
const OTHER_KEY: &str = "ws-other-key-0123456789";
/// How long to watch for a message that must not come.
const QUIET: Duration = Duration::from_millis(300);

pub async fn requests_and_answers(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let mut ws = Ws::authenticated(&server.ws_url("/ws"), &key, None).await?;

    let empty = ws
        .request(
            json!({"type": "sync_request", "request_id": 7, "device_id": "d1", "since_version": 0}),
        )
        .await?;
    assert_eq!(
        empty,
        json!({"type": "sync_response", "request_id": 7, "operations": [], "version": 0, "has_more": false,
               "features": ["patch"]})
    );

    let pushed = ws
        .request(json!({"type": "push_operations", "request_id": 8, "device_id": "d1",
                        "operations": [op("a", "create", "s1", Some("one")), op("b", "create", "s2", Some("two"))]}))
        .await?;
    assert_eq!(pushed["type"], "push_response");
    assert_eq!(pushed["success"], true);
    assert_eq!(pushed["version"], 2);
    assert_eq!(pushed["conflicts"], json!([]));
    assert_eq!(pushed["accepted"][1], json!({"op_id": "b", "version": 2}));

    // Old clients send `{}` for an empty list and whole numbers as floats.
    let empty_push = ws
        .request(json!({"type": "push_operations", "request_id": 9, "device_id": "d1", "operations": {}}))
        .await?;
    assert_eq!(empty_push["success"], true);
    let paged = ws
        .request(json!({"type": "sync_request", "request_id": "ten", "device_id": "d2", "since_version": 0.0, "limit": 1}))
        .await?;
    assert_eq!(ids(&paged), ["a"]);
    assert_eq!(paged["has_more"], true);
    assert_eq!(paged["version"], 1);

    let pong = ws
        .request(json!({"type": "ping", "request_id": 11}))
        .await?;
    assert_eq!(pong, json!({"type": "pong", "request_id": 11}));
    ws.send(json!({"type": "ping"})).await?;
    assert_eq!(ws.recv().await?, json!({"type": "pong"}));

    // Errors are answered, with the request id when there is one, and the socket stays open.
    let errors: Vec<(Value, &str)> = vec![
        (
            json!({"type": "teleport", "request_id": 12}),
            "unknown message type `teleport`",
        ),
        (
            json!({"type": "auth", "api_key": KEY, "request_id": 13}),
            "already authenticated",
        ),
        (
            json!({"type": "push_operations", "request_id": 14, "device_id": "d1",
                   "operations": [op("c", "create", "../x", None)]}),
            "operation 0: story_id must not contain path separators",
        ),
        (
            json!({"type": "sync_request", "request_id": 15, "device_id": "d1", "since_version": 0, "limit": 0}),
            "limit",
        ),
        (
            json!({"type": "push_operations", "request_id": 16, "operations": []}),
            "invalid push_operations message",
        ),
    ];
    for (message, expected) in errors {
        let answer = ws.request(message.clone()).await?;
        assert_eq!(answer["type"], "error", "{message}");
        let text = answer["error"].as_str().unwrap_or_default();
        assert!(text.contains(expected), "{message}: {text}");
    }
    ws.send_raw(Message::text("{broken")).await?;
    let broken = ws.recv().await?;
    assert_eq!(broken["type"], "error");
    ws.send_raw(Message::binary(vec![1, 2, 3])).await?;
    assert_eq!(ws.recv().await?["type"], "error");

    // Nothing invalid was stored.
    let all = ws
        .request(json!({"type": "sync_request", "request_id": 17, "device_id": "d2", "since_version": 0}))
        .await?;
    assert_eq!(ids(&all), ["a", "b"]);

    // The root path upgrades too (clients configured with the bare server URL).
    let mut root = Ws::authenticated(&server.ws_url("/"), &key, None).await?;
    let version = root
        .request(
            json!({"type": "sync_request", "request_id": 1, "device_id": "d3", "since_version": 2}),
        )
        .await?;
    assert_eq!(version["version"], 2);
    Ok(())
}

pub async fn fan_out_to_other_devices(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let other = db.add_key("other", OTHER_KEY)?;
    let server = db.start(&[])?;
    let url = server.ws_url("/ws");
    let mut laptop = Ws::authenticated(&url, &key, Some("laptop")).await?;
    let mut phone = Ws::authenticated(&url, &key, None).await?;
    let mut stranger = Ws::authenticated(&url, &other, Some("stranger")).await?;
    // The phone says who it is with its first request, like the old client.
    phone
        .request(json!({"type": "sync_request", "request_id": 1, "device_id": "phone", "since_version": 0}))
        .await?;

    // A WebSocket push reaches the other device at once, not the pusher or other namespaces.
    let started = Instant::now();
    let pushed = laptop
        .request(
            json!({"type": "push_operations", "request_id": 2, "device_id": "laptop",
                        "operations": [op("l1", "create", "s1", Some("from laptop"))]}),
        )
        .await?;
    assert_eq!(pushed["success"], true);
    let change = phone.recv().await?;
    let latency = started.elapsed();
    assert_eq!(change["type"], "remote_change");
    assert_eq!(change["operation"]["id"], "l1");
    assert_eq!(change["operation"]["version"], 1);
    assert_eq!(change["operation"]["data"]["title"], "from laptop");
    // Milliseconds on loopback; the bound leaves room for a loaded CI machine.
    assert!(
        latency < Duration::from_millis(500),
        "remote_change took {latency:?}"
    );
    println!("remote_change after a WebSocket push: {latency:?}");
    assert!(
        laptop.recv_within(QUIET).await?.is_none(),
        "the pusher got its own change back"
    );
    assert!(
        stranger.recv_within(QUIET).await?.is_none(),
        "another namespace got the change"
    );

    // An HTTP push fans out too, skipping sockets of the pushing device.
    let api = Api::new(&server, Some(&key));
    api.push(
        "phone",
        &[
            op("p1", "create", "s2", Some("from phone")),
            op("p2", "update", "s1", Some("edited on phone")),
        ],
    )
    .await?;
    let first = laptop.recv().await?;
    let second = laptop.recv().await?;
    assert_eq!(
        [&first["operation"]["id"], &second["operation"]["id"]],
        ["p1", "p2"]
    );
    assert!(
        phone.recv_within(QUIET).await?.is_none(),
        "the phone got its own HTTP push back"
    );

    // Re-sent (duplicate) operations are not announced again.
    api.push("phone", &[op("p1", "create", "s2", Some("from phone"))])
        .await?;
    assert!(
        laptop.recv_within(QUIET).await?.is_none(),
        "a duplicate was announced"
    );
    Ok(())
}

pub async fn authentication_rules(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&["--ws-auth-timeout", "1s"])?;
    let url = server.ws_url("/ws");

    // Anything before auth is refused and the socket closed.
    let mut early = Ws::connect(&url).await?;
    early
        .send(
            json!({"type": "sync_request", "request_id": 1, "device_id": "d", "since_version": 0}),
        )
        .await?;
    assert_eq!(
        early.recv().await?,
        json!({"type": "auth_failed", "reason": "expected an auth message first"})
    );
    assert_eq!(early.closed().await?, Some(1008));

    // A socket that stays silent is closed after the auth timeout.
    let started = Instant::now();
    let mut silent = Ws::connect(&url).await?;
    assert_eq!(
        silent.recv().await?,
        json!({"type": "auth_failed", "reason": "authentication timeout"})
    );
    assert_eq!(silent.closed().await?, Some(1008));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // A good key works, and a clean close from the client is answered.
    let mut good = Ws::authenticated(&url, &key, None).await?;
    good.send_raw(Message::Close(None)).await?;
    good.closed().await?;
    let api = Api::new(&server, Some(&key));
    assert_eq!(api.version().await?, 0);
    Ok(())
}

/// Two server processes on one PostgreSQL database: consistent sequence
/// numbers, and pushes through either reach WebSocket clients of both.
pub async fn fan_out_across_two_processes(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let first = db.start(&[])?;
    let second = db.start(&[])?;
    let mut on_first = Ws::authenticated(&first.ws_url("/ws"), &key, Some("laptop")).await?;
    let mut on_second = Ws::authenticated(&second.ws_url("/ws"), &key, Some("phone")).await?;
    // The LISTEN connection is set up in the background at start: wait until a push
    // through one process reaches the other, so the assertions below are about behaviour.
    let api_second = Api::new(&second, Some(&key));
    wait_until_linked(&api_second, &mut on_first).await?;
    while on_second.recv_within(QUIET).await?.is_some() {}

    let started = Instant::now();
    api_second
        .push("tablet", &[op("t1", "create", "s1", Some("via second"))])
        .await?;
    let change = on_first.recv().await?;
    println!("remote_change across processes: {:?}", started.elapsed());
    assert_eq!(change["operation"]["id"], "t1");
    let local = on_second.recv().await?;
    assert_eq!(local["operation"]["id"], "t1");

    let pushed = on_first
        .request(
            json!({"type": "push_operations", "request_id": 1, "device_id": "laptop",
                        "operations": [op("l1", "update", "s1", Some("via first"))]}),
        )
        .await?;
    assert_eq!(pushed["success"], true);
    assert_eq!(on_second.recv().await?["operation"]["id"], "l1");
    assert!(
        on_first.recv_within(QUIET).await?.is_none(),
        "the pusher got its own change back"
    );

    // Concurrent pushes through both processes get unique, gap-free versions.
    let before = api_second.version().await?;
    let mut tasks = Vec::new();
    for client in 0..6 {
        let server: &Server = if client % 2 == 0 { &first } else { &second };
        let api = Api::new(server, Some(&key));
        tasks.push(tokio::spawn(async move {
            for round in 0..8 {
                let ops: Vec<Value> = (0..4)
                    .map(|i| {
                        let id = format!("x{client}-{round}-{i}");
                        op(&id, "create", &id, Some("x"))
                    })
                    .collect();
                api.push(&format!("device-{client}"), &ops)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await?.map_err(fail)?;
    }
    let api_first = Api::new(&first, Some(&key));
    let all = api_first.fetch("observer", before, None).await?;
    let mut versions: Vec<u64> = all["operations"]
        .as_array()
        .ok_or_else(|| fail("no operations"))?
        .iter()
        .filter_map(|o| o["version"].as_u64())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (before + 1..=before + 192).collect::<Vec<_>>());
    assert_eq!(api_first.version().await?, before + 192);
    assert_eq!(api_second.version().await?, before + 192);
    Ok(())
}

/// Pushes probe operations through `api` until one shows up on `socket` (bounded).
async fn wait_until_linked(api: &Api, socket: &mut Ws) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 0.. {
        let id = format!("probe-{attempt}");
        api.push("prober", &[op(&id, "create", &id, None)]).await?;
        if let Some(change) = socket.recv_within(Duration::from_millis(200)).await? {
            if change["type"] == "remote_change" {
                // Drain any earlier probes that arrive late.
                while socket
                    .recv_within(Duration::from_millis(100))
                    .await?
                    .is_some()
                {}
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    Err(fail("pushes through one process never reached the other"))
}
