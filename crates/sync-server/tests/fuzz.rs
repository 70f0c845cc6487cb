//! Property tests of the server's request handling, in process (the axum
//! router over a SQLite store): arbitrary methods, paths, queries, headers
//! and bodies, and push bodies shaped like the real thing with arbitrary
//! parts. No panic, never a 5xx, every error a JSON `{"error": …}`, and the
//! memory a request allocates bounded by a small multiple of its size (an
//! allocator counting this thread's allocations). WebSocket messages go to
//! the same router served on loopback: every message is answered and the
//! session stays usable.
//!
//! `PROPTEST_CASES` raises the number of cases (`make fuzz`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{Method, Request};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use sync_server::config::{Limits, Settings};
use sync_server::keys;
use sync_server::store::{SqliteDurability, SqliteStore, Storage};
use sync_server::{router, AppState};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

#[path = "../../sync-core/tests/support/reliability.rs"]
mod reliability;

use reliability::{figure, proptest_config};

const KEY: &str = "fuzz-key-0123456789";

/// Counts the bytes this thread has allocated and not freed, and the peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// bookkeeping only touches this thread's counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns what it gave and the most memory this thread held
/// during it, above what it held before.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, usize::try_from(peak - base).unwrap_or(0))
}

fn settings(blob_dir: &TempDir) -> Settings {
    let mut settings = Settings {
        limits: Limits {
            max_body_bytes: 1024 * 1024,
            ..Limits::default()
        },
        ..Settings::default()
    };
    settings.blobs.dir = Some(blob_dir.path().to_owned());
    settings
}

async fn app(dir: &TempDir) -> Router {
    let store = SqliteStore::open(&dir.path().join("sync.db"), SqliteDurability::Normal)
        .expect("open store");
    store
        .add_key("fuzz".into(), keys::hash(KEY), 0)
        .await
        .expect("add key");
    router(AppState::new(store, settings(dir)), "")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Answers one request; checks the answer is never a 5xx and every error is
/// JSON with an `error` message. Returns the status and body.
async fn answer(app: &Router, request: Request<Body>) -> Result<(u16, Value), String> {
    // Answers to HEAD have no body.
    let head = request.method() == Method::HEAD;
    let response = app
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let encoding = response
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = to_bytes(response.into_body(), 64 << 20)
        .await
        .map_err(|e| e.to_string())?;
    if status >= 500 {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status >= 400 && !head && encoding.is_none() && !body["error"].is_string() {
        return Err(format!(
            "HTTP {status} without a JSON error: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    Ok((status, body))
}

/// Any JSON document, nested a little.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A push body: the right shape with each part sometimes wrong.
fn push_body() -> impl Strategy<Value = Value> {
    let text = |good: &'static [&'static str]| {
        prop_oneof![
            6 => prop::sample::select(good).prop_map(|s| json!(s)),
            1 => json(),
        ]
    };
    let operation = (
        text(&["op-1", "op-2", "op-3", ""]),
        text(&["create", "UPDATE", "delete", "metadata_update", "rename"]),
        text(&["s1", "s2", "a/b", "..", "_whisker_sync_state", "", "x\u{1}y"]),
        prop_oneof![3 => Just(json!({"title": "t"})), 1 => json()],
        prop_oneof![3 => (0i64..2_000_000_000).prop_map(|t| json!(t)), 1 => json()],
        prop::option::of(prop_oneof![(0i64..20).prop_map(|v| json!(v)), json()]),
    )
        .prop_map(|(id, kind, story, data, timestamp, base)| {
            let mut op =
                json!({"id": id, "type": kind, "story_id": story, "data": data, "timestamp": timestamp});
            if let Some(base) = base {
                op["base_version"] = base;
            }
            op
        });
    (
        prop_oneof![4 => Just(json!("device")), 1 => json()],
        prop_oneof![
            6 => prop::collection::vec(operation, 0..5).prop_map(Value::Array),
            1 => json(),
        ],
    )
        .prop_map(|(device, operations)| json!({"device_id": device, "operations": operations}))
}

/// An arbitrary request: method, path, query, authorization, body.
fn request() -> impl Strategy<Value = Request<Body>> {
    let method = prop::sample::select(vec![
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
        Method::HEAD,
    ]);
    let path = prop_oneof![
        prop::sample::select(vec![
            "/operations",
            "/version",
            "/health",
            "/metrics",
            "/",
            "/ws",
            "/blobs/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "/blobs/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/status",
            "/blobs/nothex",
            "/operations/extra",
        ])
        .prop_map(str::to_owned),
        "/[a-z%0-9./]{0,20}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        "[a-z]{1,6}=[-0-9a-z.%+]{0,24}(&[a-z]{1,6}=[-0-9a-z.%]{0,12}){0,3}"
            .prop_map(|q| format!("?{q}")),
        (any::<i64>(), any::<i64>()).prop_map(|(s, l)| format!("?device=d&since={s}&limit={l}")),
        Just("?since=18446744073709551616&limit=1e3".to_owned()),
    ];
    let auth = prop_oneof![
        4 => Just(Some(format!("Bearer {KEY}"))),
        1 => Just(None),
        1 => "[ -~]{0,40}".prop_map(Some),
    ];
    let body = prop_oneof![
        3 => push_body().prop_map(|b| b.to_string().into_bytes()),
        1 => json().prop_map(|b| b.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ];
    let gzip = prop::bool::weighted(0.1);
    (method, path, query, auth, body, gzip).prop_map(|(method, path, query, auth, body, gzip)| {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{path}{query}"))
            .header("content-type", "application/json");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        if gzip {
            request = request.header("content-encoding", "gzip");
        }
        request
            .body(Body::from(body))
            .unwrap_or_else(|_| Request::new(Body::empty()))
    })
}

#[test]
fn arbitrary_requests_never_fail_the_server() {
    let rt = runtime();
    let dir = TempDir::new().expect("temp dir");
    let app = rt.block_on(app(&dir));
    let statuses = Cell::new([0u32; 6]);
    let mut runner = TestRunner::new(proptest_config(1024));
    runner
        .run(&request(), |request| {
            let (status, _) = rt
                .block_on(answer(&app, request))
                .map_err(TestCaseError::fail)?;
            let mut counts = statuses.get();
            counts[usize::from(status / 100).min(5)] += 1;
            statuses.set(counts);
            Ok(())
        })
        .expect("every request answered without a 5xx");
    let counts = statuses.get();
    figure(&format!(
        "fuzz server requests: {} arbitrary requests: {} 2xx, {} 4xx; 5xx: 0; panics: 0",
        counts.iter().sum::<u32>(),
        counts[2],
        counts[4]
    ));
}

#[test]
fn pushes_with_arbitrary_parts_are_all_or_nothing() {
    let rt = runtime();
    let dir = TempDir::new().expect("temp dir");
    let app = rt.block_on(app(&dir));
    let get = |uri: &str| {
        Request::get(uri)
            .header("authorization", format!("Bearer {KEY}"))
            .body(Body::empty())
            .unwrap_or_else(|_| Request::new(Body::empty()))
    };
    let accepted = Cell::new(0);
    let refused = Cell::new(0);
    let mut runner = TestRunner::new(proptest_config(512));
    runner
        .run(&push_body(), |body| {
            let (_, before) = rt
                .block_on(answer(&app, get("/version")))
                .map_err(TestCaseError::fail)?;
            let push = Request::post("/operations")
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap_or_else(|_| Request::new(Body::empty()));
            let (status, answer_body) = rt
                .block_on(answer(&app, push))
                .map_err(TestCaseError::fail)?;
            let (_, after) = rt
                .block_on(answer(&app, get("/version")))
                .map_err(TestCaseError::fail)?;
            match status {
                200 => {
                    accepted.set(accepted.get() + 1);
                    prop_assert_eq!(&answer_body["version"], &after["version"]);
                }
                400 | 413 => {
                    refused.set(refused.get() + 1);
                    prop_assert_eq!(&before, &after, "a refused push stored something");
                }
                other => prop_assert!(false, "HTTP {}: {}", other, answer_body),
            }
            Ok(())
        })
        .expect("pushes");
    figure(&format!(
        "fuzz server pushes: {} push bodies with arbitrary parts: {} stored, {} refused \
         (400/413) storing nothing; 5xx: 0",
        accepted.get() + refused.get(),
        accepted.get(),
        refused.get()
    ));
}

/// Hostile bodies at the size limit: the memory a request takes stays a
/// small multiple of its size.
#[test]
fn request_memory_is_bounded() {
    let rt = runtime();
    let dir = TempDir::new().expect("temp dir");
    let app = rt.block_on(app(&dir));
    let limit = settings(&dir).limits.max_body_bytes;
    // Each payload sits in the data of a valid push, filled up to the limit.
    let push = |payload: &str| {
        format!(
            r#"{{"device_id":"d","operations":[{{"id":"x","type":"create","story_id":"s","timestamp":1,"data":{{"p":{payload}}}}}]}}"#
        )
    };
    let room = limit - push("").len() - 16;
    let fill = |unit: &str, open: &str, close: &str| {
        let count = (room - open.len() - close.len()) / unit.len();
        push(&format!("{open}{}{close}", unit.repeat(count)))
    };
    let bodies = [
        ("numbers", fill("0,", "[", "0]")),
        ("empty objects", fill("{},", "[", "{}]")),
        ("empty arrays", fill("[],", "[", "[]]")),
        ("short strings", fill("\"\",", "[", "\"\"]")),
        ("escapes", fill("\\u0000", "\"", "\"")),
        ("keys", fill("\"k\":0,", "{", "\"z\":0}")),
        (
            "nesting at the depth limit",
            fill("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],", "[", "0]"),
        ),
        ("nesting beyond the limit", push(&format!("{}{}", "[".repeat(room / 2), "]".repeat(room / 2)))),
        (
            "1000 operations",
            format!(
                r#"{{"device_id":"d","operations":[{}]}}"#,
                (0..1000)
                    .map(|i| format!(r#"{{"id":"m{i}","type":"create","story_id":"m{i}","timestamp":1,"data":{{"t":"{}"}}}}"#, "x".repeat(900)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ),
        ("over the limit", "x".repeat(limit + 1)),
    ];
    let mut worst = 0.0f64;
    for (name, body) in bodies {
        let size = body.len();
        let push = Request::post("/operations")
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap_or_else(|_| Request::new(Body::empty()));
        let (result, peak) = peak_during(|| rt.block_on(answer(&app, push)));
        let (status, _) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        let ratio = peak as f64 / size as f64;
        worst = worst.max(ratio);
        println!("{name}: {size} bytes → HTTP {status}, peak {peak} bytes ({ratio:.1}×)");
        // Parsed documents take 32 bytes a node: 16× for `[0,0,…]`, 64× for
        // one-element arrays nested to the depth limit (each its own vector).
        assert!(
            peak <= 72 * size + (1 << 20),
            "{name}: {size} bytes took {peak} bytes"
        );
    }
    figure(&format!(
        "fuzz server memory: 10 hostile push bodies at the 1 MiB limit (numbers, empty objects, \
         arrays and strings, escapes, keys, nesting at and beyond the depth limit, 1000 operations, \
         oversized): peak memory per request at most {worst:.1}× the body; 5xx: 0"
    ));
}

#[test]
fn websocket_messages_are_answered() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = TempDir::new().expect("temp dir");
    let app = rt.block_on(app(&dir));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listener");
    let url = format!("ws://{}/ws", listener.local_addr().expect("address"));
    rt.spawn(async move { axum::serve(listener, app).await });
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(&url))
        .expect("connect");
    rt.block_on(ws.send(Message::text(
        json!({"type": "auth", "api_key": KEY}).to_string(),
    )))
    .expect("auth");
    let next = |ws: &mut tokio_tungstenite::WebSocketStream<_>| {
        rt.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        return serde_json::from_str::<Value>(&text).unwrap_or(Value::Null)
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        return json!({"closed": frame.map(|f| f.to_string())})
                    }
                    Ok(Some(Ok(_))) => continue,
                    _ => return Value::Null,
                }
            }
        })
    };
    assert_eq!(next(&mut ws)["type"], "auth_ok");
    let message = prop_oneof![
        3 => push_body().prop_map(|mut b| {
            b["type"] = json!("push_operations");
            b["request_id"] = json!(1);
            b.to_string()
        }),
        2 => (json(), prop::sample::select(vec!["sync_request", "push_operations", "ping", "auth", "bogus"]))
            .prop_map(|(mut b, kind)| {
                if b.is_object() {
                    b["type"] = json!(kind);
                    b["request_id"] = json!(1);
                }
                b.to_string()
            }),
        1 => ".{0,64}",
    ];
    let answered = Cell::new(0);
    let socket = std::cell::RefCell::new(ws);
    let mut runner = TestRunner::new(proptest_config(256));
    runner
        .run(&message, |text| {
            let mut ws = socket.borrow_mut();
            rt.block_on(ws.send(Message::text(text.clone())))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let reply = next(&mut ws);
            prop_assert!(
                reply["type"].is_string(),
                "{:?} was answered with {}",
                text,
                reply
            );
            answered.set(answered.get() + 1);
            Ok(())
        })
        .expect("WebSocket messages");
    let mut ws = socket.into_inner();
    rt.block_on(ws.send(Message::text(
        json!({"type": "ping", "request_id": 9}).to_string(),
    )))
    .expect("ping");
    assert_eq!(next(&mut ws)["type"], "pong");
    figure(&format!(
        "fuzz server WebSocket: {} arbitrary messages after auth, each answered, session \
         still usable; panics: 0",
        answered.get()
    ));
}
