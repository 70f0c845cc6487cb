//! In-process router tests: the axum router over a SQLite store, called
//! directly, or served on loopback for WebSocket sessions.

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sync_core::engine::content_hash;
use sync_core::patch::worthwhile;
use sync_server::config::{Limits, Settings};
use sync_server::keys;
use sync_server::store::{SqliteDurability, SqliteStore, Storage};
use sync_server::{router, AppState};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::ServiceExt;

const KEY: &str = "router-key-0123456789";

async fn app(settings: Settings) -> (Router, TempDir) {
    let dir = TempDir::new().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("sync.db"), SqliteDurability::Normal)
        .expect("open store");
    store
        .add_key("test".into(), keys::hash(KEY), 0)
        .await
        .expect("add key");
    (router(AppState::new(store, settings), ""), dir)
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn post(body: impl Into<Body>) -> Request<Body> {
    Request::post("/operations")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("request")
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Body::empty())
        .expect("request")
}

#[tokio::test]
async fn push_and_fetch_in_process() {
    let (app, _dir) = app(Settings::default()).await;
    let body = json!({"device_id": "a", "operations": [
        {"id": "1", "type": "create", "story_id": "s", "data": {"t": 1}, "timestamp": 5}
    ]});
    let (status, pushed) = call(&app, post(body.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pushed["version"], 1);
    let (status, fetched) = call(&app, get("/operations?device=b&since=0")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched["operations"][0]["version"], 1);
    let (_, version) = call(&app, get("/version?device=b")).await;
    assert_eq!(version, json!({"version": 1}));
}

#[tokio::test]
async fn every_error_is_json() {
    let limits = Limits {
        max_body_bytes: 64,
        ..Limits::default()
    };
    let (app, _dir) = app(Settings {
        limits,
        ..Settings::default()
    })
    .await;
    let unauthenticated = Request::get("/version")
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        call(&app, unauthenticated).await,
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid API key"})
        )
    );
    let (status, body) = call(&app, post("x".repeat(100))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body,
        json!({"error": "request body too large (limit 64 bytes)"})
    );
    let (status, body) = call(&app, post("{")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("malformed JSON")));
    assert_eq!(
        call(&app, get("/missing")).await,
        (StatusCode::NOT_FOUND, json!({"error": "not found"}))
    );
    let (status, body) = call(
        &app,
        Request::get("/").body(Body::empty()).expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "whisker-sync-server");
}

#[tokio::test]
async fn cors_for_configured_origins() {
    let (app, _dir) = app(Settings {
        cors_origins: vec!["https://editor.example.com".into()],
        ..Settings::default()
    })
    .await;
    let preflight = Request::options("/operations")
        .header(header::ORIGIN, "https://editor.example.com")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type",
        )
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(preflight).await.expect("infallible");
    assert!(response.status().is_success());
    assert_eq!(
        response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://editor.example.com"
    );
    let mut request = get("/version?device=d");
    request.headers_mut().insert(
        header::ORIGIN,
        "https://elsewhere.example.com".parse().expect("origin"),
    );
    let response = app.clone().oneshot(request).await.expect("infallible");
    assert!(!response
        .headers()
        .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
}

/// A story of 500 passages (about 130 KB of JSON); passage 249 reads `text`.
fn epic(text: &str) -> Value {
    let passages: Vec<Value> = (0..500)
        .map(|p| {
            json!({
                "name": format!("Passage {p}"),
                "text": if p == 249 { text.to_owned() } else { "Words of the passage. ".repeat(8) },
                "links": [format!("Passage {}", p + 1)],
            })
        })
        .collect();
    json!({"title": "Epic", "passages": passages})
}

fn core_value(value: &Value) -> sync_core::Value {
    serde_json::from_value(value.clone()).expect("plain JSON")
}

fn hash(story: &Value) -> String {
    content_hash(Some(&core_value(story)))
}

fn create(id: &str, story: &Value) -> Value {
    json!({"id": id, "type": "create", "story_id": "epic", "data": story, "timestamp": 5})
}

/// An update of `epic` from `from` to `to`, sent as a patch made on `base`.
fn patched(id: &str, base: u64, from: &Value, to: &Value) -> Value {
    let patch = worthwhile(&core_value(from), &core_value(to))
        .expect("one edited passage of a large story is worth patching");
    json!({"id": id, "type": "update", "story_id": "epic", "base_version": base,
           "patch": patch, "content_hash": hash(to), "timestamp": 6})
}

fn push_body(device: &str, ops: &[Value]) -> String {
    json!({"device_id": device, "operations": ops}).to_string()
}

async fn metrics_text(app: &Router) -> String {
    let request = Request::get("/metrics")
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let bytes = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    String::from_utf8(bytes.to_vec()).expect("UTF-8")
}

#[tokio::test]
async fn patched_update_over_http_reaches_other_devices_whole() {
    let (app, _dir) = app(Settings::default()).await;
    let (v1, v2) = (epic("Once."), epic("Once, rewritten."));
    let (status, pushed) = call(&app, post(push_body("a", &[create("full", &v1)]))).await;
    assert_eq!(
        (status, pushed["version"].clone()),
        (StatusCode::OK, json!(1))
    );
    let (_, fetched) = call(&app, get("/operations?device=b&since=0")).await;
    assert_eq!(fetched["features"], json!(["patch"]));
    assert_eq!(fetched["operations"][0]["data"], v1);

    let patch = patched("p1", 1, &v1, &v2);
    assert!(patch.to_string().len() < 400, "{patch}");
    let (status, pushed) = call(&app, post(push_body("a", std::slice::from_ref(&patch)))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pushed["success"], true);
    assert_eq!(pushed["accepted"], json!([{"op_id": "p1", "version": 2}]));

    let (_, fetched) = call(&app, get("/operations?device=b&since=1")).await;
    assert_eq!(fetched["features"], json!(["patch"]));
    let update = &fetched["operations"][0];
    assert_eq!(update["data"], v2);
    assert_eq!(
        (
            update["type"].clone(),
            update["version"].clone(),
            update["base_version"].clone()
        ),
        (json!("update"), json!(2), json!(1))
    );
    assert!(update.get("patch").is_none() && update.get("content_hash").is_none());

    // Re-sent after a lost answer: acknowledged with its version, not applied again.
    let (_, again) = call(&app, post(push_body("a", &[patch]))).await;
    assert_eq!(again["accepted"], json!([{"op_id": "p1", "version": 2}]));

    let mut wrong_hash = patched("p2", 2, &v2, &epic("Twice."));
    wrong_hash["content_hash"] = json!(hash(&v1));
    let (status, refused) = call(&app, post(push_body("a", &[wrong_hash]))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            refused["success"].clone(),
            refused["version"].clone(),
            refused["accepted"].clone()
        ),
        (json!(false), json!(2), json!([]))
    );
    assert_eq!(
        refused["conflicts"],
        json!([{"id": "epic", "type": "patch_rejected", "op_id": "p2", "server_version": 2}])
    );
    let (_, fetched) = call(&app, get("/operations?device=b&since=0")).await;
    assert_eq!(fetched["version"], 2);
    assert_eq!(fetched["operations"][0]["data"], v2);

    let metrics = metrics_text(&app).await;
    assert!(
        metrics.contains("whisker_sync_patches_applied_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("whisker_sync_patches_rejected_total 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn malformed_patched_updates_answer_400_and_store_nothing() {
    let (app, _dir) = app(Settings::default()).await;
    let (v1, v2) = (epic("Once."), epic("Once, rewritten."));
    let mut on_create = patched("p", 1, &v1, &v2);
    on_create["type"] = json!("create");
    let mut with_data = patched("p", 1, &v1, &v2);
    with_data["data"] = v2.clone();
    let mut without_base = patched("p", 1, &v1, &v2);
    without_base
        .as_object_mut()
        .expect("object")
        .remove("base_version");
    let mut object_patch = patched("p", 1, &v1, &v2);
    object_patch["patch"] = json!({"op": "replace", "path": "/title", "value": "x"});
    let mut numeric_hash = patched("p", 1, &v1, &v2);
    numeric_hash["content_hash"] = json!(7);
    for (op, reason) in [
        (on_create, "patch is only allowed on update operations"),
        (with_data, "an update with a patch must not also carry data"),
        (without_base, "an update with a patch needs base_version"),
        (object_patch, "patch must be an array"),
        (
            numeric_hash,
            "an update with a patch needs a string content_hash",
        ),
    ] {
        let body = push_body("a", &[create("full", &v1), op]);
        assert_eq!(
            call(&app, post(body)).await,
            (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("operation 1: {reason}")})
            )
        );
    }
    let (_, version) = call(&app, get("/version")).await;
    assert_eq!(version, json!({"version": 0}));
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn authenticated(url: &str, device: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    send(
        &mut socket,
        json!({"type": "auth", "api_key": KEY, "device_id": device}),
    )
    .await;
    assert_eq!(receive(&mut socket).await["type"], "auth_ok");
    socket
}

/// The router served on a loopback port, and two authenticated sockets to
/// it: devices `a` (the writer) and `b` (the reader).
async fn served_socket_pair() -> (TempDir, Socket, Socket) {
    let (app, dir) = app(Settings::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let url = format!("ws://{}/ws", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let writer = authenticated(&url, "a").await;
    let reader = authenticated(&url, "b").await;
    (dir, writer, reader)
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .expect("send");
}

/// The next JSON message, control frames skipped.
async fn receive(socket: &mut Socket) -> Value {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s");
        match next {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).expect("JSON"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Device `a` creates story `full` over `socket`, acknowledged as version 1.
async fn create_over_socket(socket: &mut Socket, story: &Value) {
    send(
        socket,
        json!({"type": "push_operations", "request_id": 1, "device_id": "a",
               "operations": [create("full", story)]}),
    )
    .await;
    assert_eq!(receive(socket).await["version"], 1);
}

#[tokio::test]
async fn patched_update_over_websocket_fans_out_whole() {
    let (_dir, mut writer, mut reader) = served_socket_pair().await;
    let (v1, v2) = (epic("Once."), epic("Once, rewritten."));

    create_over_socket(&mut writer, &v1).await;
    assert_eq!(receive(&mut reader).await["operation"]["data"], v1);
    send(
        &mut writer,
        json!({"type": "sync_request", "request_id": 2, "device_id": "a", "since_version": 0}),
    )
    .await;
    let synced = receive(&mut writer).await;
    assert_eq!(synced["type"], "sync_response");
    assert_eq!(synced["features"], json!(["patch"]));

    send(
        &mut writer,
        json!({"type": "push_operations", "request_id": 3, "device_id": "a",
                             "operations": [patched("p1", 1, &v1, &v2)]}),
    )
    .await;
    let pushed = receive(&mut writer).await;
    assert_eq!(pushed["accepted"], json!([{"op_id": "p1", "version": 2}]));
    let change = receive(&mut reader).await;
    assert_eq!(change["type"], "remote_change");
    assert_eq!(change["operation"]["data"], v2);
    assert!(change["operation"].get("patch").is_none());
    assert!(change["operation"].get("content_hash").is_none());

    // Made on a copy that missed the previous edit: it applies, but the
    // result is not the story the client holds.
    let mut renamed = v1.clone();
    renamed["title"] = json!("Epic II");
    let stale_content = patched("p2", 2, &v1, &renamed);
    send(
        &mut writer,
        json!({"type": "push_operations", "request_id": 4, "device_id": "a",
                             "operations": [stale_content]}),
    )
    .await;
    let refused = receive(&mut writer).await;
    assert_eq!(
        refused["conflicts"],
        json!([{"id": "epic", "type": "patch_rejected", "op_id": "p2", "server_version": 2}])
    );
    send(
        &mut reader,
        json!({"type": "sync_request", "request_id": 5, "device_id": "b", "since_version": 0}),
    )
    .await;
    let synced = receive(&mut reader).await;
    assert_eq!(synced["operations"][0]["data"], v2);
    assert_eq!(synced["version"], 2);
}

/// A patched form served to a client that asked for it: no `data`, and its
/// patch turns `previous` into the story its `content_hash` names.
fn assert_patched_form(served: &Value, previous: &Value, version: u64, base: u64) -> Value {
    assert!(served.get("data").is_none(), "{served}");
    assert_eq!(
        (served["version"].clone(), served["base_version"].clone()),
        (json!(version), json!(base))
    );
    let patch = core_value(&served["patch"]);
    let story = sync_core::patch::apply(&core_value(previous), &patch).expect("the patch applies");
    assert_eq!(
        served["content_hash"],
        json!(content_hash(Some(&story))),
        "the patched story is the one the hash names"
    );
    serde_json::to_value(story).expect("plain JSON")
}

#[tokio::test]
async fn patched_updates_are_served_patched_to_clients_that_ask() {
    let (app, _dir) = app(Settings::default()).await;
    let (v1, v2) = (epic("Once."), epic("Once, rewritten."));
    call(&app, post(push_body("a", &[create("full", &v1)]))).await;
    let (_, pushed) = call(&app, post(push_body("a", &[patched("p1", 1, &v1, &v2)]))).await;
    assert_eq!(pushed["version"], 2);

    let (status, fetched) = call(&app, get("/operations?device=b&since=1&patches=1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (fetched["version"].clone(), fetched["has_more"].clone()),
        (json!(2), json!(false))
    );
    let served = &fetched["operations"][0];
    assert!(served.to_string().len() < 600, "{served}");
    assert_eq!(assert_patched_form(served, &v1, 2, 1), v2);
    let (_, also) = call(&app, get("/operations?device=b&since=1&patches=true")).await;
    assert_eq!(&also["operations"][0], served);

    let (_, whole) = call(&app, get("/operations?device=b&since=1")).await;
    assert_eq!(whole["operations"][0]["data"], v2);
    let (_, declined) = call(&app, get("/operations?device=b&since=1&patches=0")).await;
    assert_eq!(declined, whole);
    let (_, snapshot) = call(&app, get("/operations?device=b&since=0&patches=1")).await;
    assert_eq!(
        snapshot["operations"][0]["data"], v2,
        "a snapshot holds no base"
    );

    assert_eq!(
        call(&app, get("/operations?device=b&since=1&patches=maybe")).await,
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "query parameter `patches`: must be 1, true, 0 or false"})
        )
    );
}

#[tokio::test]
async fn sync_requests_with_patches_get_patched_updates() {
    let (_dir, mut writer, mut reader) = served_socket_pair().await;
    let (v1, v2) = (epic("Once."), epic("Once, rewritten."));
    create_over_socket(&mut writer, &v1).await;
    send(
        &mut writer,
        json!({"type": "push_operations", "request_id": 2, "device_id": "a",
               "operations": [patched("p1", 1, &v1, &v2)]}),
    )
    .await;
    assert_eq!(receive(&mut writer).await["version"], 2);
    let change = receive(&mut reader).await;
    assert_eq!(change["operation"]["data"], v1);
    let change = receive(&mut reader).await;
    assert_eq!(change["operation"]["data"], v2, "remote_change stays whole");

    send(
        &mut reader,
        json!({"type": "sync_request", "request_id": 3, "device_id": "b",
               "since_version": 1, "patches": true}),
    )
    .await;
    let synced = receive(&mut reader).await;
    assert_eq!(synced["type"], "sync_response");
    assert_eq!(synced["version"], 2);
    assert_eq!(assert_patched_form(&synced["operations"][0], &v1, 2, 1), v2);
    send(
        &mut reader,
        json!({"type": "sync_request", "request_id": 4, "device_id": "b", "since_version": 1}),
    )
    .await;
    assert_eq!(receive(&mut reader).await["operations"][0]["data"], v2);
}
