//! Convergence against the real reference server: three devices make random
//! creates, edits (to random fields) and deletes, sync in random orders and
//! stay offline for random stretches; after everyone syncs twice with no new
//! edits, every replica holds the same stories. Some stories are long enough
//! for their edits to travel as patches. Once per strategy and seed,
//! each seed in its own namespace (API key) on one server.
//!
//! `WHISKER_SYNC_SEEDS` sets the seeds per strategy (default 75; `make
//! converge` runs thousands). A failure names its seed and strategy.

mod support;

use std::time::Duration;

use support::{runtime, Server};
use sync_core::engine::{
    Conflict, Decision, Engine, EngineConfig, Host, HostError, HttpLink, MemoryStorage,
    MemoryStore, Outcome, Progress,
};
use sync_core::protocol::ConflictStrategy;
use sync_core::state::StateManager;
use sync_core::transport::http::{HttpConfig, HttpTransport};
use sync_core::value::{Map, Value};

/// Counts conflicts; as a manual resolver, keeps the larger version (by its
/// JSON text), a rule every device applies alike.
#[derive(Default)]
struct Referee {
    conflicts: usize,
}

impl Host for Referee {
    fn progress(&mut self, _: Progress) {}

    fn resolve(&mut self, conflict: &Conflict) -> Result<Option<Decision>, HostError> {
        let text = |v: &Option<Value>| {
            v.as_ref()
                .map(|v| v.to_canonical_json().unwrap_or_default())
        };
        let keep_local = text(&conflict.local.data) >= text(&conflict.remote.data);
        Ok(Some(if keep_local {
            Decision::KeepLocal
        } else {
            Decision::TakeRemote
        }))
    }

    fn conflict_settled(&mut self, _: &Conflict, _: &Outcome, _: bool) {
        self.conflicts += 1;
    }
}

struct Device {
    engine: Engine,
    storage: MemoryStorage,
    state: StateManager<MemoryStore>,
    link: HttpLink,
    referee: Referee,
}

impl Device {
    fn new(
        name: &str,
        strategy: ConflictStrategy,
        url: &str,
        key: &str,
        runtime: &tokio::runtime::Runtime,
    ) -> Device {
        let mut config = HttpConfig::new(url, key);
        config.timeout = Duration::from_secs(10);
        config.retry_delay = Duration::from_millis(20);
        Device {
            engine: Engine::new(EngineConfig {
                device_id: name.to_owned(),
                strategy,
                tracks_events: false,
            }),
            storage: MemoryStorage::default(),
            state: StateManager::open(MemoryStore::default()).expect("state"),
            link: HttpLink::new(
                HttpTransport::new(config).expect("transport"),
                runtime.handle().clone(),
                7,
            ),
            referee: Referee::default(),
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        self.engine
            .sync(
                &mut self.storage,
                Some(&mut self.link),
                &mut self.state,
                &mut self.referee,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Sets one field of a story, creating it if needed. Even-numbered
    /// stories carry a long text, so their edits travel as patches.
    fn edit(&mut self, story: &str, field: &str, value: i64) {
        let entry = self
            .storage
            .stories
            .entry(story.to_owned())
            .or_insert_with(|| {
                let long = story.ends_with(['0', '2', '4']);
                let mut fields = Map::new();
                if long {
                    fields.insert(
                        "prose".to_owned(),
                        Value::from("Once upon a time. ".repeat(300)),
                    );
                }
                Value::Object(fields)
            });
        if let Value::Object(fields) = entry {
            fields.insert(field.to_owned(), Value::Int(value));
        }
    }
}

/// xorshift: a seed reproduces a run exactly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Run<'a> {
    server: &'a Server,
    runtime: &'a tokio::runtime::Runtime,
    strategy: ConflictStrategy,
    seed: u64,
}

impl Run<'_> {
    fn devices(&self, scenario: &str) -> Vec<Device> {
        let key = format!("{scenario}-{}-{}", self.strategy.as_str(), self.seed);
        self.server.add_key(&key);
        ["d1", "d2", "d3"]
            .iter()
            .map(|name| {
                Device::new(
                    name,
                    self.strategy,
                    &self.server.http_url(),
                    &key,
                    self.runtime,
                )
            })
            .collect()
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        format!(
            "seed {} strategy {}: {what}",
            self.seed,
            self.strategy.as_str()
        )
    }

    /// Everyone syncs twice, then all replicas must be identical.
    fn settle(&self, devices: &mut [Device]) -> Result<(), String> {
        for _ in 0..2 {
            for device in devices.iter_mut() {
                device.sync().map_err(|e| self.fail(e))?;
            }
        }
        for (i, device) in devices.iter().enumerate().skip(1) {
            if device.storage.stories != devices[0].storage.stories {
                return Err(self.fail(format!(
                    "replicas differ after settling:\n d1: {:?}\n d{}: {:?}",
                    devices[0].storage.stories,
                    i + 1,
                    device.storage.stories
                )));
            }
        }
        Ok(())
    }

    /// Random edits, deletes, syncs and offline stretches; returns the
    /// conflicts seen and the stories left.
    fn random(&self) -> Result<(usize, usize), String> {
        let mut devices = self.devices("random");
        let mut rng = Rng::new(self.seed);
        let mut offline = [false; 3];
        for _ in 0..40 {
            let d = rng.below(3) as usize;
            let story = format!("story-{}", rng.below(5));
            match rng.below(8) {
                0 => {
                    devices[d].storage.stories.remove(&story);
                }
                1..=4 => {
                    let field = format!("f{}", rng.below(4));
                    devices[d].edit(&story, &field, rng.below(100) as i64);
                }
                5 => offline[d] = !offline[d],
                _ if offline[d] => {}
                _ => devices[d].sync().map_err(|e| self.fail(e))?,
            }
        }
        self.settle(&mut devices)?;
        let conflicts = devices.iter().map(|d| d.referee.conflicts).sum();
        Ok((conflicts, devices[0].storage.stories.len()))
    }

    /// Each device edits a different field of a shared story while offline:
    /// under auto-merge every edit survives on every replica.
    fn field_edits_survive(&self) -> Result<(), String> {
        let mut devices = self.devices("fields");
        let mut rng = Rng::new(self.seed ^ 0xF1E1D);
        devices[0].edit("shared", "title", 0);
        devices[0].edit("shared", "body", 0);
        devices[0].edit("shared", "tags", 0);
        self.settle(&mut devices)?;
        let fields = ["title", "body", "tags"];
        let mut expected = devices[0].storage.stories["shared"].clone();
        for (device, field) in devices.iter_mut().zip(fields) {
            let value = 1 + rng.below(1000) as i64;
            device.edit("shared", field, value);
            if let Value::Object(map) = &mut expected {
                map.insert(field.to_owned(), Value::Int(value));
            }
        }
        let mut order: Vec<usize> = vec![0, 1, 2];
        let first = rng.below(3) as usize;
        order.swap(0, first);
        for i in order {
            devices[i].sync().map_err(|e| self.fail(e))?;
        }
        self.settle(&mut devices)?;
        let merged = &devices[0].storage.stories["shared"];
        if merged != &expected {
            return Err(self.fail(format!(
                "field edits lost: expected {expected:?}, got {merged:?}"
            )));
        }
        Ok(())
    }
}

fn seeds() -> u64 {
    std::env::var("WHISKER_SYNC_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(75)
}

fn converge(strategy: ConflictStrategy) {
    let server = Server::start();
    let runtime = runtime();
    let (mut conflicts, mut stories) = (0, 0);
    for seed in 1..=seeds() {
        let run = Run {
            server: &server,
            runtime: &runtime,
            strategy,
            seed,
        };
        let (c, s) = run.random().unwrap_or_else(|e| panic!("{e}"));
        conflicts += c;
        stories += s;
        if strategy == ConflictStrategy::AutoMerge {
            run.field_edits_survive().unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The runs must exercise conflicts and leave stories to compare.
    assert!(
        conflicts as u64 >= seeds(),
        "{strategy:?}: only {conflicts} conflicts"
    );
    assert!(
        stories as u64 >= seeds(),
        "{strategy:?}: only {stories} stories"
    );
    // Edits of the long stories travelled as patches.
    let applied = server.metric("whisker_sync_patches_applied_total");
    assert!(applied >= seeds(), "{strategy:?}: only {applied} patches");
}

#[test]
fn last_write_wins_converges() {
    converge(ConflictStrategy::LastWriteWins);
}

#[test]
fn auto_merge_converges_and_keeps_every_field_edit() {
    converge(ConflictStrategy::AutoMerge);
}

#[test]
fn keep_both_converges() {
    converge(ConflictStrategy::KeepBoth);
}

#[test]
fn manual_with_a_resolver_converges() {
    converge(ConflictStrategy::Manual);
}
