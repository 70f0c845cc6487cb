//! Running the server: restart, keys, health, metrics, shutdown, TLS, path prefix.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    expect_status, fail, file_in, ids, op, Api, Backend, Database, Signal, TestResult, Ws,
};

const KEY: &str = "ops-key-0123456789";

pub async fn restart_keeps_data(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));
    api.push(
        "d1",
        &[
            op("a", "create", "s1", Some("kept")),
            op("b", "create", "s2", Some("also kept")),
        ],
    )
    .await?;
    let status = server.stop(Signal::Interrupt)?;
    assert!(
        status.success(),
        "SIGINT should end the server cleanly, got {status}"
    );

    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));
    assert_eq!(api.version().await?, 2);
    let fetched = api.fetch("d2", 0, None).await?;
    assert_eq!(ids(&fetched), ["a", "b"]);
    assert_eq!(fetched["operations"][0]["data"]["title"], "kept");
    // Sequence numbers carry on, and ids stay known (a retry after restart is still a duplicate).
    let again = api
        .push(
            "d1",
            &[
                op("a", "create", "s1", Some("kept")),
                op("c", "create", "s3", None),
            ],
        )
        .await?;
    assert_eq!(
        again["accepted"],
        json!([{"op_id": "a", "version": 1}, {"op_id": "c", "version": 3}])
    );
    Ok(())
}

pub async fn keys_cli(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let added = db.keys(&["add", "laptop"])?;
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let stdout = String::from_utf8(added.stdout)?;
    let generated = stdout
        .lines()
        .last()
        .ok_or_else(|| fail("no output"))?
        .to_owned();
    assert!(
        generated.starts_with("wsk_") && generated.len() == 68,
        "{generated}"
    );
    let chosen = db.keys(&["add", "--name", "demo", "--key", "demo-key-0123456789"])?;
    assert!(chosen.status.success());

    let list = db.keys(&["list"])?;
    let listing = String::from_utf8(list.stdout)?;
    assert!(
        listing.contains("laptop") && listing.contains("demo"),
        "{listing}"
    );
    assert!(
        !listing.contains(&generated) && !listing.contains("demo-key-0123456789"),
        "keys leaked: {listing}"
    );
    assert_eq!(listing.matches("active").count(), 2);

    for (args, what) in [
        (
            vec!["add", "dup", "--key", "demo-key-0123456789"],
            "already registered",
        ),
        (vec!["add", "weak", "--key", "short"], "printable ASCII"),
        (vec!["revoke", "nobody"], "no active key"),
    ] {
        let output = db.keys(&args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(what),
            "{args:?}: {stderr}"
        );
    }

    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&generated));
    expect_status(&api.get("/version?device=x").await?, 200)?;
    let revoked = db.keys(&["revoke", "laptop"])?;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    expect_status(&api.get("/version?device=x").await?, 401)?;
    let listing = String::from_utf8(db.keys(&["list"])?.stdout)?;
    assert_eq!(listing.matches("revoked").count(), 1, "{listing}");
    // Revoking by id works too.
    let revoked = db.keys(&["revoke", "2"])?;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    Ok(())
}

pub async fn health_and_metrics(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let public = Api::new(&server, None);
    let health = public.get("/health").await?;
    expect_status(&health, 200)?;
    assert_eq!(health.body, json!({"status": "ok"}));

    let api = Api::new(&server, Some(&key));
    let mut socket = Ws::authenticated(&server.ws_url("/ws"), &key, Some("watcher")).await?;
    api.push(
        "d1",
        &[op("a", "create", "s1", None), op("b", "create", "s2", None)],
    )
    .await?;
    socket.recv().await?;
    let mut conflicting = op("c", "update", "s1", None);
    conflicting["base_version"] = json!(0);
    api.push("d1", &[conflicting]).await?;

    let metrics = public.get("/metrics").await?;
    expect_status(&metrics, 200)?;
    let text = metrics
        .body
        .as_str()
        .ok_or_else(|| fail("metrics are not text"))?;
    for line in [
        "whisker_sync_operations_accepted_total 2",
        "whisker_sync_conflicts_total 1",
        "whisker_sync_websocket_connections 1",
        "whisker_sync_remote_changes_sent_total 2",
        r#"whisker_sync_http_requests_total{route="/operations",method="POST",status="200"} 2"#,
        r#"whisker_sync_http_request_duration_seconds_count{route="/operations"} 2"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert!(!text.contains(KEY));
    Ok(())
}

pub async fn graceful_shutdown(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let mut socket = Ws::authenticated(&server.ws_url("/ws"), &key, None).await?;
    let pid = server.pid().ok_or_else(|| fail("no pid"))?;

    // A push whose body is still arriving when the signal comes is finished and stored.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body =
        json!({"device_id": "d1", "operations": [op("late", "create", "s1", Some("in flight"))]})
            .to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    let request = format!(
        "POST /operations HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    crate::support::signal(pid, Signal::Term)?;
    assert_eq!(
        socket.closed().await?,
        Some(1001),
        "WebSockets are closed with 1001"
    );
    stream.write_all(tail.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(r#""accepted":[{"op_id":"late","version":1}]"#),
        "{answer}"
    );

    let status = server.wait_exit()?;
    assert!(status.success(), "{status}");
    let server = db.start(&[])?;
    assert_eq!(Api::new(&server, Some(&key)).version().await?, 1);
    Ok(())
}

pub async fn tls(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let cert_path = file_in(&db, "cert.pem");
    let key_path = file_in(&db, "key.pem");
    std::fs::write(&cert_path, certified.cert.pem())?;
    std::fs::write(&key_path, certified.signing_key.serialize_pem())?;
    let server = db.start(&[
        "--tls-cert",
        &cert_path.display().to_string(),
        "--tls-key",
        &key_path.display().to_string(),
    ])?;
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(
            certified.cert.pem().as_bytes(),
        )?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let api = Api::with_client(&server.base, Some(&key), client);
    api.push("d1", &[op("a", "create", "s1", Some("over TLS"))])
        .await?;
    let fetched = api.fetch("d2", 0, None).await?;
    assert_eq!(fetched["operations"][0]["data"]["title"], "over TLS");

    // Plain HTTP on the TLS port fails instead of leaking data.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let plain_url = server.base.replacen("https", "http", 1);
    assert!(plain
        .get(format!("{plain_url}/health"))
        .send()
        .await
        .is_err());

    // Unreadable certificate files stop startup with a clear message.
    let broken = db.start(&[
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    match broken {
        Ok(_) => Err(fail("server started without its certificate")),
        Err(e) => {
            assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
            Ok(())
        }
    }
}

pub async fn base_path(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&["--base-path", "/sync"])?;
    let root = Api::new(&server, Some(&key));
    expect_status(&root.get("/operations?device=d&since=0").await?, 404)?;
    let mut prefixed = Api::new(&server, Some(&key));
    prefixed.base = format!("{}/sync", server.base);
    prefixed
        .push("d1", &[op("a", "create", "s1", None)])
        .await?;
    assert_eq!(prefixed.version().await?, 1);
    let mut socket = Ws::authenticated(&server.ws_url("/sync/ws"), &key, None).await?;
    let answer = socket
        .request(
            json!({"type": "sync_request", "request_id": 1, "device_id": "d2", "since_version": 0}),
        )
        .await?;
    assert_eq!(ids(&answer), ["a"]);
    Ok(())
}
