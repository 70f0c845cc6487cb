//! In-process router tests: the axum router over a SQLite store, no sockets.

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use sync_server::config::{Limits, Settings};
use sync_server::keys;
use sync_server::store::{SqliteDurability, SqliteStore, Storage};
use sync_server::{router, AppState};
use tempfile::TempDir;
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
