//! Load: 32 devices (the real sync engine over the native HTTP client, each
//! on its own thread) edit and sync against one server for a bounded time,
//! on each backend. Each device edits stories of its own (updates, deletes,
//! re-creates) and stories every device shares (concurrent edits, settled by
//! last-write-wins). Afterwards every device syncs until all agree, and:
//!
//! - every device holds the same stories, and each device's own stories hold
//!   the last value it wrote (no edit lost);
//! - nothing is left queued;
//! - the server stored each operation once: sequence numbers equal stored
//!   operations, and a snapshot names every story and operation once;
//! - the server's resident memory, sampled every 100 ms from
//!   `/proc/<pid>/status`, stays under a bound and stops growing.
//!
//! `WHISKER_LOAD_SECONDS` (default 4) and `WHISKER_LOAD_CLIENTS` (default 32)
//! size the run; `make soak` runs minutes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_core::engine::{Engine, EngineConfig, HttpLink, MemoryStorage, MemoryStore, QuietHost};
use sync_core::protocol::ConflictStrategy;
use sync_core::state::StateManager;
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::value::Value;

use crate::support::{env_count, fail, figure, rss_kib, Api, Backend, Database, Rng, TestResult};

const KEY: &str = "load-key-0123456789";
/// Stories each device owns.
const OWN: u64 = 4;
/// Stories all devices edit.
const SHARED: u64 = 4;
/// Resident memory the server may use at most during the run.
const RSS_LIMIT_KIB: u64 = 512 * 1024;

struct Device {
    name: String,
    engine: Engine,
    storage: MemoryStorage,
    state: StateManager<MemoryStore>,
    link: HttpLink,
    /// What this device last wrote to each of its own stories (`None`: deleted).
    own: BTreeMap<String, Option<Value>>,
    syncs: u64,
    /// Syncs that ended with an error (a push still conflicted after its
    /// retries is one: the next sync settles it).
    unsettled: u64,
    pushed: u64,
}

impl Device {
    fn new(index: u64, url: &str, runtime: &tokio::runtime::Runtime) -> Result<Device, String> {
        let name = format!("load-{index:02}");
        let mut config = HttpConfig::new(url, KEY);
        config.timeout = Duration::from_secs(30);
        config.retry_delay = Duration::from_millis(50);
        let transport = HttpTransport::new(config).map_err(|e| e.to_string())?;
        Ok(Device {
            engine: Engine::new(EngineConfig {
                device_id: name.clone(),
                strategy: ConflictStrategy::LastWriteWins,
                tracks_events: false,
            }),
            name,
            storage: MemoryStorage::default(),
            state: StateManager::open(MemoryStore::default()).map_err(|e| e.to_string())?,
            link: HttpLink::new(transport, runtime.handle().clone(), 200),
            own: BTreeMap::new(),
            syncs: 0,
            unsettled: 0,
            pushed: 0,
        })
    }

    fn sync(&mut self) -> Result<(), String> {
        self.syncs += 1;
        let report = self
            .engine
            .sync(
                &mut self.storage,
                Some(&mut self.link),
                &mut self.state,
                &mut QuietHost,
            )
            .map_err(|e| format!("{}: {e}", self.name))?;
        self.pushed += report.pushed as u64;
        Ok(())
    }

    fn story(&self, round: u64) -> Value {
        let text = format!("{} round {round}", self.name);
        Value::Object(BTreeMap::from([
            ("title".to_owned(), Value::from(text.as_str())),
            ("round".to_owned(), Value::Int(round as i64)),
        ]))
    }

    /// One round of edits: an own story changed, deleted or re-created, and
    /// now and then a shared one.
    fn edit(&mut self, round: u64, rng: &mut Rng) {
        let id = format!("{}-own-{}", self.name, rng.below(OWN));
        let story = if self.own.get(&id).is_some_and(Option::is_some) && rng.below(5) == 0 {
            None
        } else {
            Some(self.story(round))
        };
        match &story {
            Some(story) => {
                self.storage.stories.insert(id.clone(), story.clone());
            }
            None => {
                self.storage.stories.remove(&id);
            }
        }
        self.own.insert(id, story);
        if rng.below(3) == 0 {
            let shared = format!("shared-{}", rng.below(SHARED));
            self.storage.stories.insert(shared, self.story(round));
        }
    }
}

/// What the devices did, summed.
#[derive(Default)]
struct Totals {
    syncs: u64,
    unsettled: u64,
    pushed: u64,
    edits: u64,
}

pub async fn thirty_two_clients(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let pid = server.pid().ok_or_else(|| fail("no server pid"))?;
    let seconds = env_count("WHISKER_LOAD_SECONDS", 4);
    let clients = env_count("WHISKER_LOAD_CLIENTS", 32);
    let url = server.base.clone();

    // The devices run on threads of their own, with a runtime for their
    // HTTP clients; both end before this returns.
    let (devices, totals, rss) =
        std::thread::spawn(move || run_devices(&url, clients, seconds, pid))
            .join()
            .map_err(|_| fail("the load run panicked"))?
            .map_err(fail)?;

    // Everyone agrees, with every device's last writes.
    let reference = &devices[0].storage.stories;
    for device in &devices {
        if &device.storage.stories != reference {
            return Err(fail(format!("{} did not converge", device.name)));
        }
        if device.state.pending_count() != 0 {
            return Err(fail(format!("{} still has queued operations", device.name)));
        }
        for (id, last) in &device.own {
            if reference.get(id) != last.as_ref() {
                return Err(fail(format!("{id}: {}'s last edit was lost", device.name)));
            }
        }
    }

    // The server stored each operation once.
    let api = Api::new(&server, Some(KEY));
    let accepted = metric(&api, "whisker_sync_operations_accepted_total").await?;
    let duplicates = metric(&api, "whisker_sync_operations_duplicate_total").await?;
    let conflicts = metric(&api, "whisker_sync_conflicts_total").await?;
    let version = api.version().await?;
    if accepted != version {
        return Err(fail(format!(
            "{accepted} operations stored but the sequence is at {version}"
        )));
    }
    let snapshot = api.fetch("observer", 0, None).await?;
    let ops = snapshot["operations"]
        .as_array()
        .ok_or_else(|| fail("no operations"))?;
    let mut stories = std::collections::BTreeSet::new();
    let mut ids = std::collections::BTreeSet::new();
    for op in ops {
        let story = op["story_id"].as_str().unwrap_or_default().to_owned();
        if !stories.insert(story.clone()) || !ids.insert(op["id"].to_string()) {
            return Err(fail(format!("the snapshot holds {story} twice")));
        }
    }
    for id in reference.keys() {
        if !stories.contains(id) {
            return Err(fail(format!("the server lacks {id}")));
        }
    }

    let peak = rss.iter().copied().max().unwrap_or(0);
    if peak > RSS_LIMIT_KIB {
        return Err(fail(format!("server memory reached {peak} KiB")));
    }
    // No steady growth: the last quarter of the run stays near the second.
    let quarter = rss.len() / 4;
    let mean = |s: &[u64]| s.iter().sum::<u64>() / (s.len() as u64).max(1);
    let (second, last) = (
        mean(&rss[quarter..2 * quarter]),
        mean(&rss[rss.len() - quarter..]),
    );
    if quarter > 0 && last > second * 3 / 2 + 16 * 1024 {
        return Err(fail(format!(
            "server memory kept growing: {second} KiB in the second quarter, {last} KiB in the last"
        )));
    }
    figure(&format!(
        "load {backend}: {clients} clients for {seconds}s: {} syncs ({:.0}/s), {} edits, {} operations \
         pushed and acknowledged, {} stored ({:.0}/s), {duplicates} re-sent and acknowledged once, {conflicts} pushes refused \
         as conflicts and settled, {} syncs ended unsettled and were settled by the next; converged: \
         {} stories on every device; lost: 0, duplicated: 0; server RSS peak {} MiB (second quarter \
         {} MiB, last quarter {} MiB, {} samples)",
        totals.syncs,
        totals.syncs as f64 / seconds as f64,
        totals.edits,
        totals.pushed,
        accepted,
        accepted as f64 / seconds as f64,
        totals.unsettled,
        reference.len(),
        peak / 1024,
        second / 1024,
        last / 1024,
        rss.len(),
    ));
    Ok(())
}

async fn metric(api: &Api, name: &str) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let reply = api.get("/metrics").await?;
    let text = reply.body.as_str().unwrap_or_default().to_owned();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .ok_or_else(|| fail(format!("no {name} in /metrics")))
}

type RunResult = Result<(Vec<Device>, Totals, Vec<u64>), String>;

fn run_devices(url: &str, clients: u64, seconds: u64, pid: u32) -> RunResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut devices = (0..clients)
        .map(|i| Device::new(i, url, &runtime))
        .collect::<Result<Vec<_>, _>>()?;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !done.load(Ordering::SeqCst) {
                if let Some(kib) = rss_kib(pid) {
                    samples.push(kib);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut totals = Totals::default();
    let outcome = std::thread::scope(|scope| {
        let workers: Vec<_> = devices
            .iter_mut()
            .enumerate()
            .map(|(i, device)| {
                scope.spawn(move || {
                    let mut rng = Rng::new(i as u64 + 1);
                    let mut edits = 0;
                    let mut round = 0;
                    while Instant::now() < deadline {
                        round += 1;
                        device.edit(round, &mut rng);
                        edits += 1;
                        if let Err(e) = device.sync() {
                            if !e.contains("still conflicted") {
                                return Err(e);
                            }
                            device.unsettled += 1;
                        }
                    }
                    Ok(edits)
                })
            })
            .collect();
        let mut outcome = Ok(());
        for worker in workers {
            match worker.join() {
                Ok(Ok(edits)) => totals.edits += edits,
                Ok(Err(e)) => outcome = Err(e),
                Err(_) => outcome = Err("a device thread panicked".to_owned()),
            }
        }
        outcome
    });
    done.store(true, Ordering::SeqCst);
    let samples = sampler.join().map_err(|_| "the sampler panicked")?;
    outcome?;
    // Quiet now: everyone syncs until all agree (bounded).
    for _ in 0..4 {
        for device in &mut devices {
            device.sync()?;
        }
        let first = &devices[0].storage.stories;
        if devices
            .iter()
            .all(|d| &d.storage.stories == first && d.state.pending_count() == 0)
        {
            break;
        }
    }
    for device in &devices {
        totals.syncs += device.syncs;
        totals.unsettled += device.unsettled;
        totals.pushed += device.pushed;
    }
    drop(runtime);
    Ok((devices, totals, samples))
}
