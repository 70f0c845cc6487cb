//! Property tests of everything that decodes input from elsewhere: wire
//! messages from arbitrary bytes, operations from arbitrary documents, the
//! engine fed arbitrary remote operations, and the HTTP and WebSocket clients
//! fed arbitrary answers by a server. Nothing may panic; what is refused is
//! refused without side effects; what is accepted round-trips.
//!
//! `PROPTEST_CASES` raises the number of cases (`make fuzz`).

mod support;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use support::proxy::{Fault, Proxy, Route};
use support::reliability::{cases, figure, proptest_config};
use support::{runtime, Server, KEY};
use sync_core::engine::{
    validate_story_id, ContentSource, Engine, EngineConfig, FetchPage, HostError, MemoryStorage,
    MemoryStore, PushReply, QuietHost, SyncError, Transport,
};
use sync_core::protocol::{ConflictStrategy, Operation};
use sync_core::state::StateManager;
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::transport::websocket::{WsClient, WsConfig};
use sync_core::value::Value;
use sync_core::wire::{
    ClientMessage, FetchResponse, PushRequest, PushResponse, ServerMessage, VersionResponse,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Any document: scalars of every kind (odd floats included), nested arrays
/// and objects.
fn document() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.0),
            Just(1e300)
        ]
        .prop_map(Value::Float),
        ".{0,12}".prop_map(Value::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(Value::Object),
        ]
    })
}

/// A field that is mostly well-formed, sometimes absent, sometimes anything.
fn field(good: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        8 => good.prop_map(Some),
        1 => Just(None),
        1 => document().prop_map(Some),
    ]
    .boxed()
}

fn one_of(names: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::sample::select(names).prop_map(Value::from)
}

/// Documents shaped like operations: each known field mostly well-formed,
/// sometimes absent or of a random kind, plus stray fields.
fn operation_like() -> impl Strategy<Value = Value> {
    let object =
        prop::collection::btree_map("[a-z]{1,6}", document(), 0..4).prop_map(Value::Object);
    (
        field(one_of(&["op-1", "op-2", "op-3", ""])),
        field(one_of(&[
            "create",
            "UPDATE",
            "delete",
            "metadata_update",
            "rename",
        ])),
        field(one_of(&[
            "story",
            "other",
            "Story Two",
            "../etc/passwd",
            "a/b",
            "_whisker_sync_state",
            "",
            "a\u{0}b",
        ])),
        field(object),
        field(prop_oneof![
            (0i64..2_000_000_000).prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float)
        ]),
        field((0i64..1000).prop_map(Value::Int)),
        field(one_of(&["device-x", "device-a", ""])),
        prop::collection::btree_map("[a-z_]{1,8}", document(), 0..3),
    )
        .prop_map(
            |(id, kind, story, data, timestamp, version, device, extra)| {
                let mut fields: BTreeMap<String, Value> = extra;
                for (name, value) in [
                    ("id", id),
                    ("type", kind),
                    ("story_id", story),
                    ("data", data),
                    ("timestamp", timestamp),
                    ("version", version),
                    ("device_id", device),
                ] {
                    if let Some(value) = value {
                        fields.insert(name.to_owned(), value);
                    }
                }
                Value::Object(fields)
            },
        )
}

/// JSON text: mostly valid documents, some cut or with a byte changed.
fn json_text() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![document(), operation_like()]
        .prop_map(|v| serde_json::to_vec(&v).unwrap_or_default());
    prop_oneof![
        2 => valid.clone(),
        1 => (valid.clone(), any::<prop::sample::Index>())
            .prop_map(|(text, at)| text[..at.index(text.len() + 1)].to_vec()),
        1 => (valid, any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut text, at, byte)| {
            if !text.is_empty() {
                let i = at.index(text.len());
                text[i] = byte;
            }
            text
        }),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Decodes `bytes` as every wire type; returns how many decoded.
fn decode_everything(bytes: &[u8]) -> usize {
    let mut decoded = 0;
    let mut count = |ok: bool| decoded += usize::from(ok);
    count(serde_json::from_slice::<Value>(bytes).is_ok());
    count(serde_json::from_slice::<Operation>(bytes).is_ok());
    count(serde_json::from_slice::<ClientMessage>(bytes).is_ok());
    count(serde_json::from_slice::<ServerMessage>(bytes).is_ok());
    count(serde_json::from_slice::<FetchResponse>(bytes).is_ok());
    count(serde_json::from_slice::<PushResponse>(bytes).is_ok());
    count(serde_json::from_slice::<PushRequest>(bytes).is_ok());
    count(serde_json::from_slice::<VersionResponse>(bytes).is_ok());
    if let Ok(response) = serde_json::from_slice::<PushResponse>(bytes) {
        let _ = response.accepted();
    }
    decoded
}

#[test]
fn wire_messages_decode_from_arbitrary_bytes() {
    let mut runner = TestRunner::new(proptest_config(512));
    let decoded = Cell::new(0);
    runner
        .run(&json_text(), |bytes| {
            decoded.set(decoded.get() + decode_everything(&bytes));
            Ok(())
        })
        .expect("no panic, no failure");
    // Deep nesting is refused, not a stack overflow.
    for depth in [100, 10_000, 1_000_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        decode_everything(deep.as_bytes());
        let deep = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        decode_everything(deep.as_bytes());
    }
    figure(&format!(
        "fuzz wire decoding: {} inputs (JSON, cut JSON, corrupted JSON, random bytes, nesting to \
         10^6) as 8 message types, {} decodings succeeded; panics: 0",
        cases(512) + 6,
        decoded.get()
    ));
}

#[test]
fn operations_from_arbitrary_documents() {
    let mut runner = TestRunner::new(proptest_config(1024));
    let (accepted, refused) = (Cell::new(0), Cell::new(0));
    runner
        .run(&prop_oneof![operation_like(), document()], |doc| {
            let by_ref = Operation::from_value(&doc);
            let by_move = Operation::from_document(doc.clone());
            prop_assert_eq!(&by_ref, &by_move);
            match by_ref {
                Ok(op) => {
                    accepted.set(accepted.get() + 1);
                    // What was accepted round-trips, through documents and JSON.
                    let again = Operation::from_value(&op.to_value());
                    prop_assert_eq!(again.as_ref(), Ok(&op));
                    if let Ok(json) = serde_json::to_string(&op) {
                        let decoded: Result<Operation, _> = serde_json::from_str(&json);
                        if let Ok(decoded) = decoded {
                            prop_assert_eq!(decoded.id, op.id);
                        }
                    }
                }
                Err(message) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(!message.is_empty());
                }
            }
            Ok(())
        })
        .expect("operation decoding");
    figure(&format!(
        "fuzz operations from documents: {} documents, {} accepted (all round-trip), {} refused \
         with a message; panics: 0",
        accepted.get() + refused.get(),
        accepted.get(),
        refused.get()
    ));
}

/// A transport whose fetch answers with the given operations once.
struct Scripted {
    page: Option<Vec<Value>>,
}

impl Transport for Scripted {
    fn fetch(&mut self, _: &str, since: u64, _: bool) -> Result<FetchPage, HostError> {
        Ok(FetchPage {
            operations: self.page.take().unwrap_or_default(),
            version: since + 1,
            has_more: false,
            bytes_received: 0,
            accepts_patches: false,
        })
    }

    fn push(
        &mut self,
        _: &str,
        operations: &[Operation],
        _: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError> {
        Ok(PushReply {
            success: true,
            accepted: operations
                .iter()
                .enumerate()
                .map(|(i, op)| (op.id.clone(), 100 + i as u64))
                .collect(),
            ..PushReply::default()
        })
    }
}

#[test]
fn engine_refuses_bad_remote_operations_without_side_effects() {
    let mut runner = TestRunner::new(proptest_config(256));
    let (synced, refused) = (Cell::new(0), Cell::new(0));
    let strategy = prop::collection::vec(operation_like(), 1..6);
    runner
        .run(&strategy, |page| {
            let mut engine = Engine::new(EngineConfig {
                device_id: "device-a".into(),
                strategy: ConflictStrategy::LastWriteWins,
                tracks_events: false,
            });
            let mut storage = MemoryStorage::default();
            let mut state = StateManager::open(MemoryStore::default()).expect("state");
            let story = Value::Object(BTreeMap::from([("title".into(), Value::from("mine"))]));
            storage.stories.insert("story".into(), story);
            // Queued while offline, so a failed sync must keep it.
            engine
                .sync(&mut storage, None, &mut state, &mut QuietHost)
                .expect("offline scan");
            let before = (storage.clone(), state.pending_operations());
            let mut transport = Scripted { page: Some(page) };
            match engine.sync(
                &mut storage,
                Some(&mut transport),
                &mut state,
                &mut QuietHost,
            ) {
                Ok(_) => synced.set(synced.get() + 1),
                Err(SyncError::InvalidRemote(message)) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(message.starts_with("operation "), "{}", message);
                    prop_assert_eq!(&storage, &before.0);
                    prop_assert_eq!(state.pending_operations(), before.1);
                }
                Err(other) => prop_assert!(false, "unexpected failure: {}", other),
            }
            // Whatever happened, no story id that could escape was stored.
            for id in storage.stories.keys() {
                prop_assert!(validate_story_id(id).is_ok(), "stored {:?}", id);
            }
            Ok(())
        })
        .expect("engine fed arbitrary operations");
    figure(&format!(
        "fuzz engine remote operations: {} pages of arbitrary operations, {} synced, {} refused \
         as invalid with storage and queue untouched; unsafe story ids stored: 0; panics: 0",
        synced.get() + refused.get(),
        synced.get(),
        refused.get()
    ));
}

#[test]
fn http_client_survives_arbitrary_answers() {
    let server = Server::start();
    let rt = runtime();
    let proxy = Proxy::start(rt.handle(), server.addr);
    let mut config = HttpConfig::new(proxy.http_url(), KEY);
    config.max_retries = 0;
    config.timeout = Duration::from_secs(5);
    let client = HttpTransport::new(config).expect("transport");
    let op = Operation::new(
        sync_core::protocol::OpType::Create,
        "s",
        Some(Value::empty_object()),
    );
    let mut runner = TestRunner::new(proptest_config(128));
    let answers = Cell::new(0);
    runner
        .run(&json_text(), |body| {
            answers.set(answers.get() + 2);
            proxy.inject(Route::Fetch, Fault::Body(body.clone()), 1);
            let _ = rt.block_on(client.fetch_operations("d", 0, None));
            proxy.inject(Route::Push, Fault::Body(body), 1);
            let _ = rt.block_on(client.push_operations("d", std::slice::from_ref(&op)));
            Ok(())
        })
        .expect("HTTP client");
    // Still in working order.
    rt.block_on(client.server_version("d"))
        .expect("a real answer");
    figure(&format!(
        "fuzz HTTP client answers: {} arbitrary answer bodies to fetches and pushes; panics: 0",
        answers.get()
    ));
}

#[test]
fn websocket_client_survives_arbitrary_messages() {
    let rt = runtime();
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("listener");
    let url = format!("ws://{}/ws", listener.local_addr().expect("address"));
    let (frames_tx, mut frames_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Message>>();
    // A server that authenticates, then answers each request with the
    // frames of the current case and a correct answer.
    rt.spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
                continue;
            };
            let _ = ws.next().await;
            let _ = ws.send(Message::text(r#"{"type":"auth_ok"}"#)).await;
            while let Some(Ok(Message::Text(request))) = ws.next().await {
                let Some(frames) = frames_rx.recv().await else {
                    return;
                };
                for frame in frames {
                    let _ = ws.send(frame).await;
                }
                let id = serde_json::from_str::<serde_json::Value>(&request)
                    .ok()
                    .and_then(|r| r.get("request_id").cloned())
                    .unwrap_or_default();
                let answer = serde_json::json!({"type": "pong", "request_id": id});
                let _ = ws.send(Message::text(answer.to_string())).await;
            }
        }
    });
    let mut config = WsConfig::new(url, KEY);
    config.response_timeout = Duration::from_secs(2);
    config.max_reconnect_delay = Duration::from_millis(100);
    let client = rt.block_on(WsClient::connect(config)).expect("connect");
    let frame = prop_oneof![
        4 => json_text().prop_map(|t| Message::text(String::from_utf8_lossy(&t).into_owned())),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::binary),
    ];
    let mut runner = TestRunner::new(proptest_config(128));
    let sent = Cell::new(0);
    runner
        .run(&prop::collection::vec(frame, 1..4), |frames| {
            sent.set(sent.get() + frames.len());
            let _ = frames_tx.send(frames);
            let _ = rt.block_on(client.request("ping", Default::default(), Duration::from_secs(2)));
            while client.try_event().is_some() {}
            Ok(())
        })
        .expect("WebSocket client");
    figure(&format!(
        "fuzz WebSocket client messages: {} arbitrary frames (JSON, cut or corrupted JSON, \
         random text and binary) among answers; panics: 0",
        sent.get()
    ));
}
