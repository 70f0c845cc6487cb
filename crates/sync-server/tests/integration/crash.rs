//! The server killed with SIGKILL while clients push concurrently, over HTTP
//! and WebSocket: every push it acknowledged is there after a restart, with
//! the sequence number it was acknowledged with; nothing is stored twice and
//! sequence numbers have no gaps.
//!
//! `WHISKER_SERVER_KILLS` sets the number of kills (default 3; `make soak`
//! runs more).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    env_count, fail, figure, op, Api, Backend, Database, Rng, Signal, TestResult, Ws,
};

const KEY: &str = "crash-key-0123456789";
const HTTP_CLIENTS: usize = 8;
const WS_CLIENTS: usize = 2;
/// Operations per push.
const BATCH: usize = 4;

/// Acknowledged operations: id → the sequence number the server answered.
type Acks = Arc<Mutex<BTreeMap<String, u64>>>;

fn record(acks: &Acks, answer: &Value) -> Result<usize, String> {
    let accepted = answer["accepted"]
        .as_array()
        .ok_or_else(|| format!("an answer without `accepted`: {answer}"))?;
    let mut acks = acks.lock().unwrap_or_else(PoisonError::into_inner);
    for entry in accepted {
        let (Some(id), Some(version)) = (entry["op_id"].as_str(), entry["version"].as_u64()) else {
            return Err(format!("a malformed `accepted` entry: {entry}"));
        };
        if acks.insert(id.to_owned(), version).is_some() {
            return Err(format!("{id} acknowledged twice"));
        }
    }
    Ok(accepted.len())
}

fn batch(prefix: &str, push: usize) -> Vec<Value> {
    (0..BATCH)
        .map(|i| {
            let id = format!("{prefix}-{push}-{i}");
            op(&id, "create", &id, Some("pushed before the kill"))
        })
        .collect()
}

pub async fn acknowledged_pushes_survive_kill9(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    let key = db.add_key("main", KEY)?;
    let kills = env_count("WHISKER_SERVER_KILLS", 3);
    let acks: Acks = Arc::default();
    let mut rng = Rng::new(kills + 7);
    let started = Instant::now();
    for kill in 0..kills {
        let server = db.start(&[])?;
        let mut tasks = Vec::new();
        for client in 0..HTTP_CLIENTS {
            let api = Api::new(&server, Some(&key));
            let acks = Arc::clone(&acks);
            let prefix = format!("k{kill}-http{client}");
            tasks.push(tokio::spawn(async move {
                for push in 0.. {
                    let body = json!({"device_id": prefix, "operations": batch(&prefix, push)});
                    // Anything but a 200 ends this client: the server is gone.
                    match api.post_raw("/operations", body.to_string()).await {
                        Ok(reply) if reply.status == 200 => record(&acks, &reply.body)?,
                        _ => return Ok::<(), String>(()),
                    };
                }
                Ok(())
            }));
        }
        for client in 0..WS_CLIENTS {
            let url = server.ws_url("/ws");
            let key = key.clone();
            let acks = Arc::clone(&acks);
            let prefix = format!("k{kill}-ws{client}");
            tasks.push(tokio::spawn(async move {
                let Ok(mut ws) = Ws::authenticated(&url, &key, Some(&prefix)).await else {
                    return Ok(());
                };
                for push in 0.. {
                    let request = json!({"type": "push_operations", "request_id": push,
                        "device_id": prefix, "operations": batch(&prefix, push)});
                    match ws.request(request).await {
                        Ok(answer) if answer["type"] == "push_response" => record(&acks, &answer)?,
                        _ => return Ok(()),
                    };
                }
                Ok(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(350))).await;
        server.stop(Signal::Kill)?;
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .map_err(|_| fail("a client did not notice the kill"))??
                .map_err(fail)?;
        }
    }

    let server = db.start(&[])?;
    let api = Api::new(&server, Some(&key));
    let all = api.fetch("observer", 0, None).await?;
    let stored: BTreeMap<String, u64> = all["operations"]
        .as_array()
        .ok_or_else(|| fail("no operations"))?
        .iter()
        .filter_map(|op| Some((op["id"].as_str()?.to_owned(), op["version"].as_u64()?)))
        .collect();
    let acks = acks.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if acks.is_empty() {
        return Err(fail("no push was acknowledged before the kills"));
    }
    let lost: Vec<_> = acks
        .iter()
        .filter(|(id, version)| stored.get(*id) != Some(version))
        .collect();
    if !lost.is_empty() {
        return Err(fail(format!(
            "{} acknowledged operations lost or renumbered after SIGKILL, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        )));
    }
    // Every operation is its own story, so all are live: numbers 1..=N, once each.
    let mut versions: Vec<u64> = stored.values().copied().collect();
    versions.sort_unstable();
    let count = versions.len() as u64;
    if versions != (1..=count).collect::<Vec<_>>() || api.version().await? != count {
        return Err(fail(
            "sequence numbers have gaps or duplicates after restarts",
        ));
    }
    figure(&format!(
        "crash server SIGKILL during concurrent pushes ({backend}, {} HTTP + {} WebSocket clients): \
         {kills} kills in {:.1}s, {} acknowledged operations all present after restart with their \
         sequence numbers, {} more stored while their answer was in flight; sequence 1..{count} \
         without gaps or duplicates; acknowledged operations lost: 0",
        HTTP_CLIENTS,
        WS_CLIENTS,
        started.elapsed().as_secs_f64(),
        acks.len(),
        count - acks.len() as u64,
    ));
    Ok(())
}
