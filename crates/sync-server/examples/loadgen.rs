//! Load generator for whisker-sync-server: push and pull throughput and
//! latency with concurrent clients, over loopback.
//!
//! ```text
//! cargo run --release -p sync-server --example loadgen -- \
//!     --url http://127.0.0.1:8787 --key KEY [--clients 1,8,32] [--batches 1,100] [--seconds 5] [--label sqlite]
//! ```
//!
//! For each (clients, batch size): every client pushes batches of new
//! operations back to back for `--seconds`, then fetches pages of that size
//! (`GET /operations?since=…&limit=…`) for `--seconds`. Prints one Markdown
//! table row per run: requests, operations per second, p50 and p99 latency.
//! Only loopback URLs are accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Server base URL (loopback only).
    #[arg(long)]
    url: String,
    /// API key of a namespace the benchmark may fill.
    #[arg(long)]
    key: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    batches: Vec<usize>,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Text for the first column (e.g. the backend).
    #[arg(long, default_value = "")]
    label: String,
}

/// Untimed requests each client makes first (connection set-up, caches).
const WARMUP_REQUESTS: usize = 5;
/// Hard cap per client and phase, whatever the duration.
const MAX_REQUESTS: usize = 1_000_000;

#[derive(Clone, Copy)]
enum Phase {
    Push,
    Pull,
}

struct Run {
    requests: usize,
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let host = reqwest::Url::parse(&args.url)?
        .host_str()
        .map(str::to_owned)
        .unwrap_or_default();
    if !["127.0.0.1", "localhost", "[::1]", "::1"].contains(&host.as_str()) {
        return Err(format!("refusing to load {host}: loopback addresses only").into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let duration = Duration::from_secs(args.seconds);
    println!("| backend | phase | clients | ops/request | requests | ops/s | p50 ms | p99 ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for &batch in &args.batches {
        for &clients in &args.clients {
            for phase in [Phase::Push, Phase::Pull] {
                let run = run_phase(&args, phase, clients, batch, duration, nonce).await?;
                let seconds = run.elapsed.as_secs_f64();
                println!(
                    "| {} | {} | {clients} | {batch} | {} | {:.0} | {:.2} | {:.2} |",
                    args.label,
                    match phase {
                        Phase::Push => "push",
                        Phase::Pull => "pull",
                    },
                    run.requests,
                    run.ops as f64 / seconds,
                    percentile(&run.latencies, 0.50),
                    percentile(&run.latencies, 0.99),
                );
            }
        }
    }
    Ok(())
}

async fn run_phase(
    args: &Args,
    phase: Phase,
    clients: usize,
    batch: usize,
    duration: Duration,
    nonce: u128,
) -> Result<Run, Box<dyn std::error::Error>> {
    let url = Arc::new(args.url.trim_end_matches('/').to_owned());
    let key = Arc::new(args.key.clone());
    let head = current_version(&url, &key).await?;
    // Whatever happens, no client runs past this.
    let hard_deadline = Instant::now() + duration * 2 + Duration::from_secs(30);
    let mut workers = Vec::new();
    for client in 0..clients {
        let url = Arc::clone(&url);
        let key = Arc::clone(&key);
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .tcp_nodelay(true)
                .build()
                .map_err(|e| e.to_string())?;
            let request = |n: usize| {
                let http = http.clone();
                let (url, key) = (Arc::clone(&url), Arc::clone(&key));
                async move {
                    match phase {
                        Phase::Push => push(&http, &url, &key, nonce, client, n, batch).await,
                        Phase::Pull => {
                            pull(&http, &url, &key, head, batch, client * 7919 + n).await
                        }
                    }
                }
            };
            for n in 0..WARMUP_REQUESTS {
                request(n).await?;
            }
            let mut latencies = Vec::new();
            let mut ops = 0;
            let measure_from = Instant::now();
            for n in WARMUP_REQUESTS..MAX_REQUESTS {
                let now = Instant::now();
                if now >= measure_from + duration || now >= hard_deadline {
                    break;
                }
                ops += request(n).await?;
                latencies.push(now.elapsed());
            }
            Ok::<_, String>((latencies, ops, measure_from.elapsed()))
        }));
    }
    let mut run = Run {
        requests: 0,
        ops: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for worker in workers {
        let (latencies, ops, elapsed) = worker.await??;
        run.requests += latencies.len();
        run.ops += ops;
        run.elapsed = run.elapsed.max(elapsed);
        run.latencies.extend(latencies);
    }
    run.latencies.sort_unstable();
    Ok(run)
}

async fn current_version(url: &str, key: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let reply: Value = reqwest::Client::new()
        .get(format!("{url}/version?device=loadgen"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    reply["version"].as_u64().ok_or_else(|| "no version".into())
}

/// Pushes `batch` new operations (each on its own story); returns how many were stored.
async fn push(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    nonce: u128,
    client: usize,
    n: usize,
    batch: usize,
) -> Result<usize, String> {
    let mut body = String::with_capacity(batch * 420 + 64);
    body.push_str(r#"{"device_id":"loadgen-"#);
    body.push_str(&client.to_string());
    body.push_str(r#"","operations":["#);
    for i in 0..batch {
        if i > 0 {
            body.push(',');
        }
        let id = format!("{nonce}-{client}-{n}-{i}");
        body.push_str(&format!(
            r#"{{"id":"{id}","type":"create","story_id":"story-{id}","timestamp":1700000000,"data":{{"title":"Benchmark story {i}","author":"loadgen","passages":[{{"name":"start","text":"Once upon a time, in a benchmark far away, a writer saved a story.","links":["next"]}},{{"name":"next","text":"And the server stored it."}}]}}}}"#
        ));
    }
    body.push_str("]}");
    let reply: Value = http
        .post(format!("{url}/operations"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if reply["success"] != true {
        return Err(format!("push refused: {reply}"));
    }
    Ok(batch)
}

/// Fetches one page of `batch` operations starting somewhere in `0..head`.
async fn pull(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    head: u64,
    batch: usize,
    seed: usize,
) -> Result<usize, String> {
    let span = head.saturating_sub(batch as u64).max(1);
    // A cheap deterministic spread of starting points (no RNG needed).
    let since = (seed as u64).wrapping_mul(2_654_435_761) % span;
    let reply: Value = http
        .get(format!(
            "{url}/operations?device=loadgen-reader&since={since}&limit={batch}"
        ))
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    Ok(reply["operations"].as_array().map_or(0, Vec::len))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}
