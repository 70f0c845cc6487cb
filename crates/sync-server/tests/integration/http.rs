//! The HTTP API: old routes and shapes, and the extensions.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{expect_status, fail, ids, op, Api, Backend, Database, TestResult, Ws};

const KEY: &str = "test-key-0123456789";

pub async fn push_then_pull_round_trip(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));

    let mut s1 = op("o1", "create", "s1", Some("Première histoire ✓"));
    s1["data"]["nested"] = json!({ "list": [1, 2.5, "x", null, true], "empty": {} });
    let pushed = api
        .push(
            "laptop",
            &[
                s1.clone(),
                op("o2", "create", "s2", Some("Two")),
                op("o3", "update", "s1", Some("One, edited")),
            ],
        )
        .await?;
    assert_eq!(pushed["success"], true);
    assert_eq!(pushed["version"], 3);
    assert_eq!(pushed["conflicts"], json!([]));
    assert_eq!(
        pushed["accepted"],
        json!([{"op_id": "o1", "version": 1}, {"op_id": "o2", "version": 2}, {"op_id": "o3", "version": 3}])
    );

    // Another device gets each story's current state; the superseded create is left out.
    let fetched = api.fetch("desktop", 0, None).await?;
    assert_eq!(ids(&fetched), ["o2", "o3"]);
    assert_eq!(fetched["version"], 3);
    assert_eq!(fetched["has_more"], false);
    let update = &fetched["operations"][1];
    assert_eq!(update["version"], 3);
    assert_eq!(update["device_id"], "laptop");
    assert_eq!(update["data"]["title"], "One, edited");
    assert_eq!(update["timestamp"], 1_700_000_000);

    // Data comes back exactly as sent.
    let only_s1 = api
        .push("tablet", &[op("o4", "update", "s1", None)])
        .await?;
    assert_eq!(only_s1["version"], 4);
    let again = api
        .push(
            "tablet",
            &[{
                let mut o = s1.clone();
                o["id"] = json!("o5");
                o
            }],
        )
        .await?;
    assert_eq!(again["version"], 5);
    let latest = api.fetch("desktop", 4, None).await?;
    assert_eq!(latest["operations"][0]["data"], s1["data"]);

    // The pushing device does not get its own operations back, but its version advances.
    let own = api.fetch("laptop", 0, None).await?;
    assert_eq!(ids(&own), ["o5"]);
    assert_eq!(own["version"], 5);
    assert_eq!(api.version().await?, 5);

    // A deletion reaches the other devices.
    api.push("desktop", &[op("o6", "delete", "s2", None)])
        .await?;
    let after = api.fetch("laptop", 5, None).await?;
    assert_eq!(ids(&after), ["o6"]);
    assert_eq!(after["operations"][0]["type"], "delete");
    assert!(after["operations"][0].get("data").is_none());
    Ok(())
}

pub async fn repush_is_idempotent(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));
    let batch = [
        op("a", "create", "s1", Some("1")),
        op("b", "create", "s2", Some("2")),
        op("c", "update", "s1", Some("3")),
    ];
    let first = api.push("d1", &batch).await?;
    let second = api.push("d1", &batch).await?;
    assert_eq!(first["version"], 3);
    assert_eq!(
        second["version"], 3,
        "a re-sent push must not store anything"
    );
    assert_eq!(second["success"], true);
    assert_eq!(second["accepted"], first["accepted"]);

    // A retry that adds one new operation stores only that one.
    let mut retry = batch.to_vec();
    retry.push(op("d", "create", "s3", Some("4")));
    let third = api.push("d1", &retry).await?;
    assert_eq!(third["version"], 4);
    assert_eq!(third["accepted"][3], json!({"op_id": "d", "version": 4}));

    // The same id twice within one push is stored once.
    let twice = api
        .push(
            "d1",
            &[
                op("e", "create", "s4", Some("5")),
                op("e", "create", "s4", Some("5")),
            ],
        )
        .await?;
    assert_eq!(twice["version"], 5);
    assert_eq!(
        twice["accepted"],
        json!([{"op_id": "e", "version": 5}, {"op_id": "e", "version": 5}])
    );

    let all = api.fetch("other", 0, None).await?;
    assert_eq!(ids(&all), ["b", "c", "d", "e"]);
    Ok(())
}

pub async fn pagination(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&["--max-page-size", "7"])?;
    let api = Api::new(&server, Some(&key));
    let ops: Vec<Value> = (0..25)
        .map(|i| {
            op(
                &format!("op{i:02}"),
                "create",
                &format!("story-{i:02}"),
                Some("t"),
            )
        })
        .collect();
    api.push("writer", &ops).await?;

    // Pages of 5, each `version` being where the next page starts.
    let mut since = 0;
    let mut seen = Vec::new();
    for page in 0.. {
        if page > 10 {
            return Err(fail("pagination did not end"));
        }
        let fetched = api.fetch("reader", since, Some(5)).await?;
        let batch = ids(&fetched);
        let more = fetched["has_more"]
            .as_bool()
            .ok_or_else(|| fail("has_more missing"))?;
        since = fetched["version"]
            .as_u64()
            .ok_or_else(|| fail("version missing"))?;
        if more {
            assert_eq!(batch.len(), 5);
            assert_eq!(fetched["operations"][4]["version"], since);
        }
        seen.extend(batch);
        if !more {
            break;
        }
    }
    assert_eq!(seen.len(), 25);
    assert_eq!(since, 25);

    // Without `limit` everything comes at once (old clients never page).
    let all = api.fetch("reader", 0, None).await?;
    assert_eq!(ids(&all).len(), 25);
    assert_eq!(all["has_more"], false);

    // A larger limit is capped by --max-page-size.
    let capped = api.fetch("reader", 0, Some(100)).await?;
    assert_eq!(ids(&capped).len(), 7);
    assert_eq!(capped["has_more"], true);
    assert_eq!(capped["version"], 7);

    // Operations of the requesting device are filtered, and `version` still
    // advances past them.
    api.push("reader", &[op("mine", "create", "mine", Some("m"))])
        .await?;
    let filtered = api.fetch("reader", 25, None).await?;
    assert_eq!(ids(&filtered), Vec::<String>::new());
    assert_eq!(filtered["version"], 26);
    let filtered_page = api.fetch("reader", 25, Some(3)).await?;
    assert_eq!(filtered_page["version"], 26);
    assert_eq!(filtered_page["has_more"], false);

    // Numbers as Lua 5.1 clients may send them, and bad ones.
    let float_since = api.get("/operations?device=x&since=20.0").await?;
    expect_status(&float_since, 200)?;
    assert_eq!(ids(&float_since.body).len(), 6);
    for bad in ["since=-1", "since=abc", "since=1.5", "limit=0", "limit=x"] {
        let reply = api.get(&format!("/operations?device=x&{bad}")).await?;
        expect_status(&reply, 400)?;
        assert!(reply.body["error"].is_string(), "{bad}: {}", reply.body);
    }
    Ok(())
}

pub async fn snapshot_and_tombstones(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&["--tombstone-retention", "1s"])?;
    let api = Api::new(&server, Some(&key));
    let mut meta1 = op("m1", "metadata_update", "s3", None);
    meta1["data"] = json!({ "tags": ["a"] });
    let mut meta2 = op("m2", "metadata_update", "s3", None);
    meta2["data"] = json!({ "tags": ["b"] });
    api.push(
        "d1",
        &[
            op("c1", "create", "s1", Some("v1")),
            op("u1", "update", "s1", Some("v2")),
            op("c2", "create", "s2", Some("doomed")),
            op("x2", "delete", "s2", None),
            op("c3", "create", "s3", Some("tagged")),
            meta1,
            meta2,
        ],
    )
    .await?;
    // Latest state per story plus the (still live) tombstone, in sequence order;
    // the newest metadata update comes with the content it applies to.
    let snapshot = api.fetch("new-device", 0, None).await?;
    assert_eq!(ids(&snapshot), ["u1", "x2", "c3", "m2"]);
    assert_eq!(snapshot["version"], 7);

    // Once the retention has passed, new devices no longer get the tombstone,
    // but a device catching up from before the deletion still does.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let snapshot = api.fetch("new-device", 0, None).await?;
        if ids(&snapshot) == ["u1", "c3", "m2"] {
            assert_eq!(snapshot["version"], 7);
            break;
        }
        if Instant::now() > deadline {
            return Err(fail(format!("tombstone never expired: {snapshot}")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let catching_up = api.fetch("old-device", 2, None).await?;
    assert_eq!(ids(&catching_up), ["x2", "c3", "m2"]);

    // A new state-carrying operation supersedes the metadata updates too.
    api.push("d1", &[op("u3", "update", "s3", Some("retitled"))])
        .await?;
    let snapshot = api.fetch("new-device", 0, None).await?;
    assert_eq!(ids(&snapshot), ["u1", "u3"]);
    Ok(())
}

pub async fn stale_base_version_conflicts(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));
    let with_base = |id: &str, kind: &str, story: &str, base: u64| {
        let mut o = op(id, kind, story, Some(id));
        o["base_version"] = json!(base);
        o
    };

    api.push("a", &[with_base("a1", "create", "s1", 0)]).await?;
    let b = api.push("b", &[with_base("b1", "update", "s1", 1)]).await?;
    assert_eq!(b["success"], true);
    assert_eq!(b["version"], 2);

    // Device a still thinks s1 is at version 1: its edit is refused, not stored.
    let stale = api
        .push(
            "a",
            &[
                with_base("a2", "update", "s1", 1),
                with_base("a3", "create", "s2", 0),
            ],
        )
        .await?;
    assert_eq!(stale["success"], false);
    assert_eq!(
        stale["conflicts"],
        json!([{"id": "s1", "type": "concurrent_modification", "op_id": "a2", "server_version": 2}])
    );
    assert_eq!(stale["accepted"], json!([{"op_id": "a3", "version": 3}]));
    assert_eq!(stale["version"], 3);
    let s1 = api.fetch("c", 0, None).await?;
    assert_eq!(ids(&s1), ["b1", "a3"]);

    // Rebased on version 2 it goes through; old clients (no base_version) always do.
    let rebased = api
        .push("a", &[with_base("a2-rebased", "update", "s1", 2)])
        .await?;
    assert_eq!(rebased["success"], true);
    let old = api
        .push("old", &[op("old1", "update", "s1", Some("old client"))])
        .await?;
    assert_eq!(old["success"], true);
    assert_eq!(old["version"], 5);

    // An operation id reused for another story is refused.
    let reused = api
        .push("a", &[op("a3", "create", "s9", Some("x"))])
        .await?;
    assert_eq!(reused["conflicts"][0]["type"], "duplicate_operation_id");
    assert_eq!(reused["version"], 5);
    Ok(())
}

pub async fn concurrent_pushes_get_unique_versions(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let mut tasks = Vec::new();
    for client in 0..8 {
        let api = Api::new(&server, Some(&key));
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                let ops: Vec<Value> = (0..3)
                    .map(|i| {
                        op(
                            &format!("c{client}-r{round}-{i}"),
                            "create",
                            &format!("c{client}-r{round}-{i}"),
                            Some("x"),
                        )
                    })
                    .collect();
                let reply = api
                    .push(&format!("device-{client}"), &ops)
                    .await
                    .map_err(|e| e.to_string())?;
                if reply["success"] != true {
                    return Err(format!("push failed: {reply}"));
                }
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await?.map_err(fail)?;
    }
    let api = Api::new(&server, Some(&key));
    let all = api.fetch("observer", 0, None).await?;
    let versions: BTreeSet<u64> = all["operations"]
        .as_array()
        .ok_or_else(|| fail("no operations"))?
        .iter()
        .filter_map(|o| o["version"].as_u64())
        .collect();
    assert_eq!(versions, (1..=240).collect::<BTreeSet<u64>>());
    assert_eq!(all["version"], 240);
    Ok(())
}

pub async fn malformed_input_writes_nothing(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[
        "--max-ops-per-push",
        "5",
        "--max-body-bytes",
        "4096",
        "--max-json-depth",
        "16",
    ])?;
    let api = Api::new(&server, Some(&key));
    let good = op("ok", "create", "fine", Some("t"));
    let body = |ops: Vec<Value>| json!({ "device_id": "d", "operations": ops }).to_string();
    let with_story = |story: &str| op("x", "create", story, Some("t"));
    let mut too_deep = json!("leaf");
    for _ in 0..20 {
        too_deep = json!([too_deep]);
    }
    let mut deep_op = good.clone();
    deep_op["data"]["deep"] = too_deep;

    let bad_requests: Vec<(&str, String, u16)> = vec![
        ("not JSON", "{not json".to_owned(), 400),
        ("empty body", String::new(), 400),
        ("array body", "[]".to_owned(), 400),
        (
            "no device",
            json!({ "operations": [good.clone()] }).to_string(),
            400,
        ),
        (
            "empty device",
            json!({ "device_id": "", "operations": [] }).to_string(),
            400,
        ),
        (
            "no operations",
            json!({ "device_id": "d" }).to_string(),
            400,
        ),
        (
            "operations not a list",
            json!({ "device_id": "d", "operations": "x" }).to_string(),
            400,
        ),
        (
            "non-empty object",
            json!({ "device_id": "d", "operations": {"1": good.clone()} }).to_string(),
            400,
        ),
        (
            "missing timestamp",
            body(vec![
                good.clone(),
                json!({"id": "y", "type": "create", "story_id": "s"}),
            ]),
            400,
        ),
        (
            "unknown type",
            body(vec![good.clone(), op("y", "rename", "s", None)]),
            400,
        ),
        ("empty op id", body(vec![op("", "create", "s", None)]), 400),
        ("slash", body(vec![good.clone(), with_story("a/b")]), 400),
        ("backslash", body(vec![with_story("a\\b")]), 400),
        ("dot dot", body(vec![with_story("..")]), 400),
        ("control char", body(vec![with_story("a\u{1}b")]), 400),
        (
            "reserved",
            body(vec![with_story("_whisker_sync_state")]),
            400,
        ),
        ("empty story", body(vec![with_story("")]), 400),
        ("long story", body(vec![with_story(&"s".repeat(257))]), 400),
        ("too deep", body(vec![deep_op]), 400),
        (
            "too many",
            body(
                (0..6)
                    .map(|i| op(&format!("m{i}"), "create", &format!("m{i}"), None))
                    .collect(),
            ),
            413,
        ),
        (
            "too big",
            body(vec![op("big", "create", "big", Some(&"x".repeat(5000)))]),
            413,
        ),
    ];
    for (what, body, status) in bad_requests {
        let reply = api.post_raw("/operations", body).await?;
        if reply.status != status || !reply.body["error"].is_string() {
            return Err(fail(format!(
                "{what}: expected {status} with an error, got {} {}",
                reply.status, reply.body
            )));
        }
    }
    assert_eq!(
        api.version().await?,
        0,
        "a rejected push must write nothing"
    );
    assert_eq!(ids(&api.fetch("other", 0, None).await?).len(), 0);

    // The error says what is wrong.
    let reply = api
        .post_raw(
            "/operations",
            body(vec![good.clone(), with_story("../etc")]),
        )
        .await?;
    assert_eq!(
        reply.body["error"],
        "operation 1: story_id must not contain path separators"
    );
    Ok(())
}

pub async fn old_client_shapes(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));

    // cjson encodes an empty Lua table as `{}`.
    let empty = api
        .post_raw("/operations", r#"{"device_id":"lua","operations":{}}"#)
        .await?;
    expect_status(&empty, 200)?;
    assert_eq!(empty.body["success"], true);
    assert_eq!(empty.body["conflicts"], json!([]));
    assert_eq!(empty.body["version"], 0);

    // Float timestamps (Lua 5.1), upper-case types, missing device ids, unknown fields.
    let body = r#"{"device_id":"lua","operations":[
        {"id":"u1","type":"UPDATE","story_id":"s1","data":{"title":"T"},"timestamp":1700000000.0,"metadata":{},"hint":{"x":1}}
    ]}"#;
    let pushed = api.post_raw("/operations", body).await?;
    expect_status(&pushed, 200)?;
    let fetched = api.fetch("other", 0, None).await?;
    let stored = &fetched["operations"][0];
    assert_eq!(stored["type"], "update");
    assert_eq!(stored["timestamp"], 1_700_000_000);
    assert_eq!(stored["device_id"], "lua");
    assert_eq!(stored["hint"], json!({"x": 1}));
    assert!(fetched["operations"].is_array() && fetched["has_more"].is_boolean());

    // The JSON error shape for routes and methods that do not exist.
    let missing = api.get("/nope").await?;
    expect_status(&missing, 404)?;
    assert_eq!(missing.body, json!({"error": "not found"}));
    let wrong_method = api.post_raw("/version", "{}").await?;
    expect_status(&wrong_method, 405)?;
    assert!(wrong_method.body["error"].is_string());
    Ok(())
}

pub async fn key_isolation(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key_a = db.add_key("alice", "alice-key-0123456789")?;
    let key_b = db.add_key("bob", "bob-key-0123456789")?;
    let revoked = db.add_key("carol", "carol-key-0123456789")?;
    let server = db.start(&[])?;
    let alice = Api::new(&server, Some(&key_a));
    let bob = Api::new(&server, Some(&key_b));

    let mut bob_socket =
        Ws::authenticated(&server.ws_url("/ws"), &key_b, Some("bob-phone")).await?;
    alice
        .push(
            "alice-laptop",
            &[op("shared-id", "create", "s1", Some("alice's"))],
        )
        .await?;
    assert_eq!(alice.version().await?, 1);

    // Bob sees nothing of Alice's: not by fetch, version, WebSocket or fan-out.
    assert_eq!(ids(&bob.fetch("bob-laptop", 0, None).await?).len(), 0);
    assert_eq!(bob.version().await?, 0);
    let sync = bob_socket
        .request(json!({"type": "sync_request", "request_id": 1, "device_id": "bob-phone", "since_version": 0}))
        .await?;
    assert_eq!(sync["operations"], json!([]));
    assert_eq!(sync["version"], 0);
    assert!(
        bob_socket
            .recv_within(Duration::from_millis(300))
            .await?
            .is_none(),
        "Bob's socket received Alice's change"
    );

    // The same operation id in Bob's namespace is a different operation.
    let pushed = bob
        .push(
            "bob-laptop",
            &[op("shared-id", "create", "s1", Some("bob's"))],
        )
        .await?;
    assert_eq!(
        pushed["accepted"],
        json!([{"op_id": "shared-id", "version": 1}])
    );
    let alice_view = alice.fetch("alice-phone", 0, None).await?;
    assert_eq!(alice_view["operations"][0]["data"]["title"], "alice's");
    let bob_view = bob.fetch("bob-phone", 0, None).await?;
    assert_eq!(bob_view["operations"][0]["data"]["title"], "bob's");

    // Missing, malformed, unknown and revoked keys get 401 with a JSON error on every route.
    let output = db.keys(&["revoke", "carol"])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = reqwest::Client::new();
    let no_key = Api::with_client(&server.base, None, client.clone());
    let wrong = Api::with_client(&server.base, Some("wrong-key-0123456789"), client.clone());
    let gone = Api::with_client(&server.base, Some(&revoked), client.clone());
    let body = json!({"device_id": "x", "operations": [op("z", "create", "z", None)]}).to_string();
    for api in [&no_key, &wrong, &gone] {
        for reply in [
            api.get("/operations?device=x&since=0").await?,
            api.post_raw("/operations", body.clone()).await?,
            api.get("/version?device=x").await?,
        ] {
            expect_status(&reply, 401)?;
            assert_eq!(reply.body, json!({"error": "invalid API key"}));
        }
    }
    let basic = client
        .get(format!("{}/version", server.base))
        .header("authorization", format!("Basic {key_a}"))
        .send()
        .await?;
    assert_eq!(basic.status().as_u16(), 401);
    for key in ["wrong-key-0123456789", revoked.as_str()] {
        let mut ws = crate::support::Ws::connect(&server.ws_url("/ws")).await?;
        ws.send(json!({"type": "auth", "api_key": key})).await?;
        let reply = ws.recv().await?;
        assert_eq!(
            reply,
            json!({"type": "auth_failed", "reason": "invalid API key"})
        );
        assert_eq!(ws.closed().await?, Some(1008));
    }
    assert_eq!(alice.version().await?, 1);
    assert_eq!(bob.version().await?, 1);
    Ok(())
}
