//! Negotiated compression: gzip request and answer bodies over HTTP, gzip
//! binary frames over WebSocket, and plain JSON for clients that ask for
//! nothing (the old Lua transport sends no `Accept-Encoding`).

use std::io::{Read, Write};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{fail, op, Backend, Database, TestResult, WAIT};

const KEY: &str = "compression-key-0123456789";

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// An operation carrying a story of `passages` passages (about 90 bytes each).
fn big_op(id: &str, story: &str, passages: usize) -> Value {
    let mut op = op(id, "create", story, Some("A long story"));
    op["data"]["passages"] = (0..passages)
        .map(|i| json!({"name": format!("p{i}"), "text": "The rain had not stopped for three days. [[Go on]]"}))
        .collect();
    op
}

pub async fn http_bodies_are_negotiated(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let client = reqwest::Client::builder().timeout(WAIT).build()?;
    let url = |path: &str| format!("{}{path}", server.base);

    // A client that says nothing gets plain JSON, and learns gzip is welcome.
    let push = json!({"device_id": "old", "operations": [big_op("o1", "s1", 200)]}).to_string();
    let answer = client
        .post(url("/operations"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(push.clone())
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["accept-encoding"], "gzip");
    let plain = client
        .get(url("/operations?device=x&since=0"))
        .bearer_auth(&key)
        .send()
        .await?;
    assert!(plain.headers().get("content-encoding").is_none());
    let plain_body = plain.bytes().await?;
    let fetched: Value = serde_json::from_slice(&plain_body)?;
    assert_eq!(
        fetched["operations"][0]["data"]["passages"][199]["name"],
        "p199"
    );

    // Asking for gzip gets gzip (for answers of 1 KiB and more).
    let packed = client
        .get(url("/operations?device=x&since=0"))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert_eq!(packed.headers()["content-encoding"], "gzip");
    let packed_body = packed.bytes().await?;
    assert!(packed_body.len() * 5 < plain_body.len());
    assert_eq!(gunzip(&packed_body), plain_body);
    let small = client
        .get(url("/version?device=x"))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert!(small.headers().get("content-encoding").is_none());

    // A gzip request body is decoded before it is validated and stored.
    let push = json!({"device_id": "new", "operations": [big_op("o2", "s2", 200)]}).to_string();
    let answer = client
        .post(url("/operations"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(push.as_bytes()))
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await?;
    assert_eq!(answer["success"], true);
    assert_eq!(answer["version"], 2);

    // Other codings are refused with the list of accepted ones; bad gzip is a 400.
    let refused = client
        .post(url("/operations"))
        .bearer_auth(&key)
        .header("content-encoding", "br")
        .body(push.clone())
        .send()
        .await?;
    assert_eq!(refused.status(), 415);
    assert_eq!(refused.headers()["accept-encoding"], "gzip");
    let refused: Value = refused.json().await?;
    assert!(refused["error"].is_string(), "{refused}");
    let corrupt = client
        .post(url("/operations"))
        .bearer_auth(&key)
        .header("content-encoding", "gzip")
        .body(b"\x1f\x8b not really gzip".to_vec())
        .send()
        .await?;
    assert_eq!(corrupt.status(), 400);

    // The body limit counts decoded bytes: a small bomb is refused.
    let bomb = gzip(&vec![b' '; 20 * 1024 * 1024]);
    assert!(bomb.len() < 100 * 1024);
    let refused = client
        .post(url("/operations"))
        .bearer_auth(&key)
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await?;
    assert_eq!(refused.status(), 413);
    let version: Value = client
        .get(url("/version?device=x"))
        .bearer_auth(&key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(version["version"], 2, "refused pushes stored nothing");
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text or binary frame (binary decoded from gzip), as JSON.
async fn next_message(
    socket: &mut Socket,
) -> Result<(Value, bool), Box<dyn std::error::Error + Send + Sync>> {
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await?
            .ok_or_else(|| fail("socket ended"))??;
        match frame {
            Message::Text(text) => return Ok((serde_json::from_str(&text)?, false)),
            Message::Binary(data) => return Ok((serde_json::from_slice(&gunzip(&data))?, true)),
            Message::Close(frame) => return Err(fail(format!("closed: {frame:?}"))),
            _ => {}
        }
    }
}

async fn authenticated(
    url: &str,
    auth: Value,
) -> Result<(Socket, Value), Box<dyn std::error::Error + Send + Sync>> {
    let (mut socket, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await??;
    socket.send(Message::text(auth.to_string())).await?;
    let (ok, _) = next_message(&mut socket).await?;
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    Ok((socket, ok))
}

pub async fn websocket_frames_are_negotiated(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let url = server.ws_url("/ws");
    let fetch = json!({"type": "sync_request", "request_id": 1, "since_version": 0});

    // An old client: text frames only, a binary frame is an error.
    let (mut old, ok) = authenticated(&url, json!({"type": "auth", "api_key": key})).await?;
    assert!(ok.get("compression").is_none(), "{ok}");

    // A client that offers gzip may send and gets compressed frames.
    let offer =
        json!({"type": "auth", "api_key": key, "device_id": "new", "compression": ["gzip"]});
    let (mut new, ok) = authenticated(&url, offer).await?;
    assert_eq!(ok["compression"], "gzip");
    let push = json!({"type": "push_operations", "request_id": 2, "device_id": "new",
                      "operations": [big_op("o1", "s1", 200)]});
    new.send(Message::binary(gzip(push.to_string().as_bytes())))
        .await?;
    let (answer, compressed) = next_message(&mut new).await?;
    assert_eq!(answer["type"], "push_response", "{answer}");
    assert_eq!(answer["success"], true);
    assert!(!compressed, "small answers stay text");
    new.send(Message::text(fetch.to_string())).await?;
    let (answer, compressed) = next_message(&mut new).await?;
    assert_eq!(
        answer["operations"][0]["data"]["passages"][199]["name"],
        "p199"
    );
    assert!(compressed, "large answers are compressed");

    // The old client got the remote change as text, and fetches as text.
    let (change, compressed) = next_message(&mut old).await?;
    assert_eq!(change["type"], "remote_change");
    assert!(!compressed);
    old.send(Message::text(fetch.to_string())).await?;
    let (answer, compressed) = next_message(&mut old).await?;
    assert_eq!(answer["type"], "sync_response");
    assert!(!compressed);
    old.send(Message::binary(gzip(fetch.to_string().as_bytes())))
        .await?;
    let (answer, _) = next_message(&mut old).await?;
    assert_eq!(answer["type"], "error");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("binary")),
        "{answer}"
    );
    Ok(())
}
